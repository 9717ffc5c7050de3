/* Model loader tests: config.json parsing (classic and newer forms, defaults, eos, unsupported and bad values),
 * safetensors robustness (every malformed or truncated file gives a negative code and a message naming the file and
 * the problem), model binding errors (missing tensors, bad MLX quantized tensors, sharded indexes), generated
 * weights and the manifest, and the safetensors writer.
 * Files are built in a fresh directory under /tmp (mkdtemp), removed at the end. */
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "core/core.h"
#include "engine/engine.h"
#include "model/model.h"

static char tmp_root[64];

/* ---- helpers ---- */

/* tmp_root/name (rotating static buffers) */
static const char *tmp_path(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static const char *tmp_path(const char *fmt, ...)
{
    static char buf[8][512];
    static int slot;
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof(name), fmt, ap);
    va_end(ap);
    char *b = buf[slot++ & 7];
    snprintf(b, sizeof(buf[0]), "%s/%s", tmp_root, name);
    return b;
}

static int write_file(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = n ? fwrite(data, 1, n, f) : 0;
    return (fclose(f) == 0 && w == n) ? 0 : -1;
}

static const char *make_dir(const char *name)
{
    const char *d = tmp_path("%s", name);
    mkdir(d, 0755);
    return d;
}

/* A safetensors file: 8-byte little-endian header length, the header text as given, then data. */
static void write_st(const char *path, const char *header, const void *data, size_t data_len)
{
    size_t hl = strlen(header), n = 8 + hl + data_len;
    uint8_t *buf = malloc(n);
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)((uint64_t)hl >> (8 * i));
    memcpy(buf + 8, header, hl);
    if (data_len) memcpy(buf + 8 + hl, data, data_len);
    ST_ASSERT(write_file(path, buf, n) == 0);
    free(buf);
}

/* rc must be negative (== want when want != 0) and err must name `file` and contain `what`. */
static void expect_error(const char *ctx, int rc, int want, const char *err, const char *file, const char *what)
{
    CHECK_MSG(rc < 0, "%s: accepted (rc %d)", ctx, rc);
    if (rc >= 0) return;
    if (want) CHECK_MSG(rc == want, "%s: code %d (%s), want %d (%s): %s", ctx, rc, st_strerror(rc), want, st_strerror(want), err);
    if (file) CHECK_MSG(strstr(err, file) != NULL, "%s: message does not name %s: \"%s\"", ctx, file, err);
    if (what) CHECK_MSG(strstr(err, what) != NULL, "%s: message does not say \"%s\": \"%s\"", ctx, what, err);
}

static int open_st(const char *path, char *err)
{
    struct safetensors st;
    err[0] = 0;
    int rc = safetensors_open_file(&st, path, err);
    if (rc == 0) safetensors_free(&st);
    return rc;
}

/* A header + data written to tmp_root/name, opened; must fail naming the file and saying `what`. */
static void st_bad(const char *name, const char *header, const void *data, size_t n, const char *what)
{
    char err[ST_ERR_LEN];
    const char *path = tmp_path("%s.safetensors", name);
    write_st(path, header, data, n);
    expect_error(name, open_st(path, err), ST_EFORMAT, err, path, what);
}

/* ---- config.json ---- */

static int parse(struct model_config *c, const char *json, char *err)
{
    err[0] = 0;
    return model_config_parse(c, json, strlen(json), err);
}

#define LLAMA_BASE \
    "\"model_type\":\"llama\",\"hidden_size\":64,\"intermediate_size\":160,\"num_hidden_layers\":2," \
    "\"num_attention_heads\":4,\"vocab_size\":100"

static void test_config_classic(void)
{
    char err[ST_ERR_LEN];
    struct model_config c;
    int rc = parse(&c, "{" LLAMA_BASE ",\"num_key_value_heads\":2,\"head_dim\":24,\"max_position_embeddings\":2048,"
                       "\"rms_norm_eps\":1e-5,\"rope_theta\":500000.0,\"rope_scaling\":{\"rope_type\":\"llama3\","
                       "\"factor\":32.0,\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,"
                       "\"original_max_position_embeddings\":8192},\"torch_dtype\":\"float16\",\"tie_word_embeddings\":true,"
                       "\"bos_token_id\":1,\"eos_token_id\":[2,3],\"hidden_act\":\"silu\"}", err);
    REQUIRE_MSG(rc == 0, "%s", err);
    CHECK(c.arch == ARCH_LLAMA);
    CHECK_STR(c.model_type, "llama");
    CHECK_EQ_INT(c.dim, 64);
    CHECK_EQ_INT(c.hidden_dim, 160);
    CHECK_EQ_INT(c.n_layers, 2);
    CHECK_EQ_INT(c.n_heads, 4);
    CHECK_EQ_INT(c.n_kv_heads, 2);
    CHECK_EQ_INT(c.head_dim, 24);
    CHECK_EQ_INT(c.vocab_size, 100);
    CHECK_EQ_INT(c.max_seq_len, 2048);
    CHECK_NEAR(c.norm_eps, 1e-5, 1e-12);
    CHECK_NEAR(c.rope_theta, 500000.0, 0);
    CHECK(c.rope_type == ROPE_LLAMA3);
    CHECK_NEAR(c.rope_factor, 32.0, 0);
    CHECK_NEAR(c.rope_low_freq_factor, 1.0, 0);
    CHECK_NEAR(c.rope_high_freq_factor, 4.0, 0);
    CHECK_EQ_INT(c.rope_orig_max_pos, 8192);
    CHECK(c.dtype == DT_F16);
    CHECK(c.tie_embeddings);
    CHECK(!c.qk_norm && !c.attn_bias);
    CHECK_EQ_INT(c.q_bits, 0);
    CHECK_EQ_INT(c.bos_id, 1);
    CHECK_EQ_INT(c.n_eos, 2);
    CHECK_EQ_INT(c.eos_ids[0], 2);
    CHECK_EQ_INT(c.eos_ids[1], 3);

    /* classic linear scaling, spelled with "type" as older configs do */
    rc = parse(&c, "{" LLAMA_BASE ",\"rope_theta\":10000,\"rope_scaling\":{\"type\":\"linear\",\"factor\":4.0}}", err);
    REQUIRE_MSG(rc == 0, "%s", err);
    CHECK(c.rope_type == ROPE_LINEAR);
    CHECK_NEAR(c.rope_factor, 4.0, 0);
    double f[8], f0[8];
    rope_inv_freq(&c, f);
    c.rope_type = ROPE_DEFAULT;
    rope_inv_freq(&c, f0);
    for (int j = 0; j < c.head_dim / 2; j++) {
        CHECK_NEAR(f0[j], pow(10000.0, -2.0 * j / 16), 1e-15);
        CHECK_NEAR(f[j], f0[j] / 4.0, 1e-15);
    }
}

static void test_config_new_form(void)
{
    char err[ST_ERR_LEN];
    struct model_config c;
    /* what recent transformers writes: rope_parameters and dtype, no rope_theta / torch_dtype */
    int rc = parse(&c, "{\"architectures\":[\"Qwen3ForCausalLM\"],\"model_type\":\"qwen3\",\"hidden_size\":128,"
                       "\"intermediate_size\":384,\"num_hidden_layers\":8,\"num_attention_heads\":4,"
                       "\"num_key_value_heads\":2,\"head_dim\":64,\"vocab_size\":151936,\"max_position_embeddings\":4096,"
                       "\"rms_norm_eps\":1e-06,\"tie_word_embeddings\":true,\"rope_parameters\":{\"rope_theta\":1000000.0,"
                       "\"rope_type\":\"default\"},\"attention_bias\":false,\"dtype\":\"bfloat16\",\"bos_token_id\":151643,"
                       "\"eos_token_id\":151645,\"layer_types\":[\"full_attention\"],\"sliding_window\":null}", err);
    REQUIRE_MSG(rc == 0, "%s", err);
    CHECK(c.arch == ARCH_QWEN3);
    CHECK(c.qk_norm);
    CHECK(!c.attn_bias);
    CHECK_EQ_INT(c.head_dim, 64);
    CHECK_NEAR(c.rope_theta, 1e6, 0);
    CHECK(c.rope_type == ROPE_DEFAULT);
    CHECK(c.dtype == DT_BF16);
    CHECK_EQ_INT(c.n_eos, 1);
    CHECK_EQ_INT(c.eos_ids[0], 151645);
    CHECK_EQ_INT(c.bos_id, 151643);

    /* Llama 3.1 in the newer form: the scaling parameters live in rope_parameters too */
    rc = parse(&c, "{" LLAMA_BASE ",\"rope_parameters\":{\"rope_type\":\"llama3\",\"rope_theta\":500000.0,\"factor\":8.0,"
                   "\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192},"
                   "\"dtype\":\"float32\"}", err);
    REQUIRE_MSG(rc == 0, "%s", err);
    CHECK(c.rope_type == ROPE_LLAMA3);
    CHECK_NEAR(c.rope_theta, 500000.0, 0);
    CHECK_NEAR(c.rope_factor, 8.0, 0);
    CHECK_EQ_INT(c.rope_orig_max_pos, 8192);
    CHECK(c.dtype == DT_F32);

    /* MLX quantization block */
    rc = parse(&c, "{" LLAMA_BASE ",\"quantization\":{\"group_size\":32,\"bits\":4}}", err);
    REQUIRE_MSG(rc == 0, "%s", err);
    CHECK_EQ_INT(c.q_bits, 4);
    CHECK_EQ_INT(c.q_group_size, 32);
}

static void test_config_defaults(void)
{
    char err[ST_ERR_LEN];
    struct model_config c;
    int rc = parse(&c, "{" LLAMA_BASE "}", err);
    REQUIRE_MSG(rc == 0, "%s", err);
    CHECK_EQ_INT(c.n_kv_heads, 4);  /* num_key_value_heads defaults to num_attention_heads */
    CHECK_EQ_INT(c.head_dim, 16);   /* head_dim defaults to hidden_size / num_attention_heads */
    CHECK_NEAR(c.rope_theta, 10000.0, 0);
    CHECK(c.rope_type == ROPE_DEFAULT);
    CHECK_NEAR(c.norm_eps, 1e-6, 1e-12);
    CHECK(!c.tie_embeddings);
    CHECK(c.dtype == DT_BF16);
    CHECK_EQ_INT(c.q_bits, 0);
    CHECK_EQ_INT(c.q_group_size, 0);
    CHECK_EQ_INT(c.bos_id, -1);
    CHECK_EQ_INT(c.n_eos, 0);
    CHECK(c.max_seq_len > 0);
    /* null is the same as absent */
    rc = parse(&c, "{" LLAMA_BASE ",\"head_dim\":null,\"num_key_value_heads\":null,\"rope_scaling\":null}", err);
    REQUIRE_MSG(rc == 0, "%s", err);
    CHECK_EQ_INT(c.head_dim, 16);
    CHECK_EQ_INT(c.n_kv_heads, 4);
    /* model_type from architectures */
    rc = parse(&c, "{\"architectures\":[\"Qwen2ForCausalLM\"],\"hidden_size\":56,\"intermediate_size\":64,"
                   "\"num_hidden_layers\":1,\"num_attention_heads\":7,\"vocab_size\":50}", err);
    REQUIRE_MSG(rc == 0, "%s", err);
    CHECK(c.arch == ARCH_QWEN2);
    CHECK(c.attn_bias); /* Qwen2 has q/k/v biases */
    CHECK_EQ_INT(c.head_dim, 8);
    /* quantization group size defaults to 64 */
    rc = parse(&c, "{" LLAMA_BASE ",\"quantization\":{\"bits\":8}}", err);
    REQUIRE_MSG(rc == 0, "%s", err);
    CHECK_EQ_INT(c.q_group_size, 64);
}

static void test_config_eos(void)
{
    char err[ST_ERR_LEN];
    struct model_config c;
    int rc = parse(&c, "{" LLAMA_BASE ",\"eos_token_id\":7}", err);
    REQUIRE_MSG(rc == 0, "%s", err);
    CHECK_EQ_INT(c.n_eos, 1);
    CHECK_EQ_INT(c.eos_ids[0], 7);
    /* a list: duplicates collapse */
    rc = parse(&c, "{" LLAMA_BASE ",\"eos_token_id\":[9,7,9]}", err);
    REQUIRE_MSG(rc == 0, "%s", err);
    CHECK_EQ_INT(c.n_eos, 2);
    CHECK_EQ_INT(c.eos_ids[0], 9);
    CHECK_EQ_INT(c.eos_ids[1], 7);
    /* a single eos outside the vocabulary is an error */
    rc = parse(&c, "{" LLAMA_BASE ",\"eos_token_id\":100}", err);
    expect_error("eos outside vocab", rc, ST_EFORMAT, err, "config.json", "eos_token_id");

    /* generation_config.json adds its eos ids */
    const char *dir = make_dir("eos");
    const char *cfg = "{" LLAMA_BASE ",\"eos_token_id\":2}";
    ST_ASSERT(write_file(tmp_path("eos/config.json"), cfg, strlen(cfg)) == 0);
    rc = model_config_load(&c, dir, err);
    REQUIRE_MSG(rc == 0, "%s", err);
    CHECK_EQ_INT(c.n_eos, 1);
    const char *gen = "{\"bos_token_id\":1,\"eos_token_id\":[2,5,6]}";
    ST_ASSERT(write_file(tmp_path("eos/generation_config.json"), gen, strlen(gen)) == 0);
    rc = model_config_load(&c, dir, err);
    REQUIRE_MSG(rc == 0, "%s", err);
    CHECK_EQ_INT(c.n_eos, 3);
    int seen = 0;
    for (int i = 0; i < c.n_eos; i++) seen |= 1 << c.eos_ids[i];
    CHECK_EQ_INT(seen, (1 << 2) | (1 << 5) | (1 << 6));
    gen = "{\"eos_token_id\":4}";
    ST_ASSERT(write_file(tmp_path("eos/generation_config.json"), gen, strlen(gen)) == 0);
    rc = model_config_load(&c, dir, err);
    REQUIRE_MSG(rc == 0, "%s", err);
    CHECK_EQ_INT(c.n_eos, 2);
    /* no config.json at all */
    rc = model_config_load(&c, make_dir("eos-none"), err);
    expect_error("missing config.json", rc, 0, err, "config.json", NULL);
}

static void test_config_unsupported(void)
{
    static const struct {
        const char *json, *what;
    } cases[] = {
        {"{\"model_type\":\"gpt2\",\"hidden_size\":64,\"intermediate_size\":64,\"num_hidden_layers\":1,"
         "\"num_attention_heads\":4,\"vocab_size\":10}", "gpt2"},
        {"{" LLAMA_BASE ",\"hidden_act\":\"gelu\"}", "gelu"},
        {"{" LLAMA_BASE ",\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":4.0}}", "yarn"},
        {"{" LLAMA_BASE ",\"rope_parameters\":{\"rope_type\":\"dynamic\",\"rope_theta\":10000.0,\"factor\":2.0}}", "dynamic"},
        {"{" LLAMA_BASE ",\"quantization\":{\"group_size\":64,\"bits\":3}}", "bits"},
        {"{" LLAMA_BASE ",\"quantization\":{\"group_size\":16,\"bits\":4}}", "group_size"},
    };
    for (size_t i = 0; i < ST_ARRAY_LEN(cases); i++) {
        char err[ST_ERR_LEN], ctx[64];
        struct model_config c;
        snprintf(ctx, sizeof(ctx), "unsupported case %zu", i);
        expect_error(ctx, parse(&c, cases[i].json, err), ST_EUNSUPPORTED, err, "config.json", cases[i].what);
    }
}

static void test_config_bad_values(void)
{
    static const struct {
        const char *json, *what;
    } cases[] = {
        {"{\"model_type\":\"llama\",", "line"},
        {"[1,2]", "not a JSON object"},
        {"{\"hidden_size\":64}", "model_type"},
        {"{" LLAMA_BASE ",\"hidden_size\":-64}", "hidden_size"},
        {"{" LLAMA_BASE ",\"num_hidden_layers\":\"2\"}", "num_hidden_layers"},
        {"{" LLAMA_BASE ",\"vocab_size\":0}", "vocab_size"},
        {"{\"model_type\":\"llama\",\"intermediate_size\":160,\"num_hidden_layers\":2,\"num_attention_heads\":4,"
         "\"vocab_size\":100}", "hidden_size"},
        {"{" LLAMA_BASE ",\"num_key_value_heads\":3}", "multiple"},
        {"{" LLAMA_BASE ",\"num_key_value_heads\":0}", "num_key_value_heads"},
        {"{" LLAMA_BASE ",\"head_dim\":7}", "head_dim"},
        {"{" LLAMA_BASE ",\"rope_theta\":0}", "rope_theta"},
        {"{" LLAMA_BASE ",\"rope_theta\":\"big\"}", "rope_theta"},
        {"{" LLAMA_BASE ",\"rope_scaling\":5}", "rope_scaling"},
        {"{" LLAMA_BASE ",\"rope_scaling\":{\"rope_type\":\"linear\",\"factor\":0}}", "factor"},
        {"{" LLAMA_BASE ",\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8,\"low_freq_factor\":4,"
         "\"high_freq_factor\":1}}", "low_freq_factor"},
        {"{" LLAMA_BASE ",\"rms_norm_eps\":\"small\"}", "rms_norm_eps"},
        {"{\"model_type\":\"llama\",\"hidden_size\":64,\"intermediate_size\":160,\"num_hidden_layers\":100000,"
         "\"num_attention_heads\":4,\"vocab_size\":100}", "implausible"},
        {"{" LLAMA_BASE ",\"hidden_size\":64}", "duplicate"},
    };
    for (size_t i = 0; i < ST_ARRAY_LEN(cases); i++) {
        char err[ST_ERR_LEN], ctx[64];
        struct model_config c;
        snprintf(ctx, sizeof(ctx), "bad config case %zu", i);
        expect_error(ctx, parse(&c, cases[i].json, err), ST_EFORMAT, err, "config.json", cases[i].what);
    }
    /* through model_config_load, the message also names the directory */
    char err[ST_ERR_LEN];
    struct model_config c;
    const char *dir = make_dir("badcfg");
    ST_ASSERT(write_file(tmp_path("badcfg/config.json"), "{\"model_type\":", 14) == 0);
    expect_error("bad config.json file", model_config_load(&c, dir, err), ST_EFORMAT, err, dir, "config.json");
}

/* ---- safetensors files ---- */

static void test_st_malformed(void)
{
    char err[ST_ERR_LEN];
    float data[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    /* empty file and files shorter than the length prefix */
    const char *p = tmp_path("empty.safetensors");
    ST_ASSERT(write_file(p, "", 0) == 0);
    expect_error("empty file", open_st(p, err), ST_EFORMAT, err, p, "too short");
    p = tmp_path("short.safetensors");
    ST_ASSERT(write_file(p, "\x10\x00\x00", 3) == 0);
    expect_error("3-byte file", open_st(p, err), ST_EFORMAT, err, p, "too short");
    /* header length larger than the file */
    p = tmp_path("hlen.safetensors");
    uint8_t hl[16] = {0xff, 0xff, 0, 0, 0, 0, 0, 0, '{', '}'};
    ST_ASSERT(write_file(p, hl, 10) == 0);
    expect_error("header length > file", open_st(p, err), ST_EFORMAT, err, p, "exceeds the file size");
    uint8_t huge[10] = {0, 0, 0, 0, 0, 0, 0, 0x80, '{', '}'};
    ST_ASSERT(write_file(p, huge, 10) == 0);
    expect_error("header length 2^63", open_st(p, err), ST_EFORMAT, err, p, "exceeds the file size");

    st_bad("not-json", "{\"a\": [1, 2", NULL, 0, "header JSON");
    st_bad("binary-header", "\x01\x02\x03\xff\xfe", NULL, 0, "header JSON");
    st_bad("not-object", "[{\"dtype\":\"F32\"}]", NULL, 0, "not a JSON object");
    st_bad("entry-not-object", "{\"a\":[1,2]}", NULL, 0, "not an object");
    st_bad("unknown-dtype", "{\"a\":{\"dtype\":\"Q3_K\",\"shape\":[2],\"data_offsets\":[0,8]}}", data, 8, "unknown dtype");
    st_bad("missing-dtype", "{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", data, 8, "dtype");
    st_bad("size-mismatch", "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", data, 8, "need 12 bytes");
    st_bad("size-mismatch-dtype", "{\"a\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[0,8]}}", data, 8, "need 16 bytes");
    st_bad("past-end", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[16,32]}}", data, 24, "outside");
    st_bad("begin-after-end", "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", data, 16, "outside");
    st_bad("negative-offset", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", data, 16, "outside");
    st_bad("offsets-not-pair", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", data, 16, "data_offsets");
    st_bad("offsets-float", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0.0,4.0]}}", data, 16, "data_offsets");
    st_bad("overlap", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", data, 16, "overlap");
    st_bad("same-span", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                        "\"b\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[0,8]}}", data, 16, "overlap");
    st_bad("duplicate", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                        "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", data, 16, "duplicate");
    st_bad("negative-shape", "{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", data, 16, "shape");
    st_bad("huge-shape", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2199023255552],\"data_offsets\":[0,8]}}", data, 16, "shape");
    st_bad("overflow-shape", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1099511627776,1099511627776],\"data_offsets\":[0,8]}}",
           data, 16, "shape");
    st_bad("wrapping-shape", "{\"a\":{\"dtype\":\"U8\",\"shape\":[65536,65536,65536,65536],\"data_offsets\":[0,0]}}",
           data, 16, "shape");
    st_bad("float-shape", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", data, 16, "shape");
    st_bad("five-dims", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,2],\"data_offsets\":[0,8]}}", data, 16, "shape");
    st_bad("shape-not-array", "{\"a\":{\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]}}", data, 16, "shape");

    /* a directory where a file is expected, and a missing file */
    p = make_dir("a-directory.safetensors");
    expect_error("directory", open_st(p, err), ST_EIO, err, p, "not a regular file");
    p = tmp_path("does-not-exist.safetensors");
    expect_error("missing file", open_st(p, err), ST_EIO, err, p, "No such file");
}

static void test_st_valid_edges(void)
{
    char err[ST_ERR_LEN];
    struct safetensors st;
    float data[6] = {1, 2, 3, 4, 5, 6};
    /* "{}" and metadata only: a valid file without tensors */
    const char *p = tmp_path("empty-header.safetensors");
    write_st(p, "{}      ", NULL, 0);
    int rc = safetensors_open_file(&st, p, err);
    REQUIRE_MSG(rc == 0, "%s", err);
    CHECK_EQ_INT(st.n_tensors, 0);
    CHECK(safetensors_find(&st, "a") == NULL);
    safetensors_free(&st);
    /* a zero-size tensor may sit where the next tensor starts, whatever the key order (writers lay data out by
     * dtype, not by name); an F32 at byte 2 of the data gets an aligned copy */
    p = tmp_path("zero-size.safetensors");
    uint8_t bytes[26] = {9, 8};
    memcpy(bytes + 2, data, sizeof(data));
    write_st(p, "{\"__metadata__\":{\"format\":\"pt\"},\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]},"
                "\"b\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[2,26]},"
                "\"c\":{\"dtype\":\"F16\",\"shape\":[0,4],\"data_offsets\":[2,2]},"
                "\"d\":{\"dtype\":\"BF16\",\"shape\":[3,0],\"data_offsets\":[26,26]}}", bytes, 26);
    rc = safetensors_open_file(&st, p, err);
    CHECK_MSG(rc == 0, "a zero-size tensor at the start of another must be accepted: %s", err);
    if (rc == 0) {
        CHECK_EQ_INT(st.n_tensors, 4);
        const struct st_tensor *b = safetensors_find(&st, "b"), *c = safetensors_find(&st, "c");
        CHECK(safetensors_find(&st, "__metadata__") == NULL);
        REQUIRE(b && c);
        CHECK_EQ_INT(b->n_dims, 2);
        CHECK_EQ_INT(b->shape[1], 3);
        CHECK_EQ_INT(c->nbytes, 0);
        CHECK_EQ_INT((uintptr_t)b->data % 4, 0);
        CHECK(memcmp(b->data, data, sizeof(data)) == 0);
        safetensors_free(&st);
    }
}

/* Truncating a real model file at any point gives an error naming the file (and model_load names it too). */
static void test_st_truncated(void)
{
    char err[ST_ERR_LEN];
    const char *src = fixture_path("shapes/qwen3-q4-g128-untied/model.safetensors");
    char *buf = NULL;
    size_t n = 0;
    if (file_read_all(src, &buf, &n, 64u << 20, err) < 0) SKIP("%s (run `make fixtures`)", err);
    REQUIRE(n > 64);
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++) hlen |= (uint64_t)(uint8_t)buf[i] << (8 * i);
    REQUIRE(hlen < n);
    const char *dir = make_dir("truncated");
    const char *cfg_src = fixture_path("shapes/qwen3-q4-g128-untied/config.json");
    char *cfg = NULL;
    size_t cfg_len = 0;
    REQUIRE_MSG(file_read_all(cfg_src, &cfg, &cfg_len, 1 << 20, err) == 0, "%s", err);
    ST_ASSERT(write_file(tmp_path("truncated/config.json"), cfg, cfg_len) == 0);
    const char *path = tmp_path("truncated/model.safetensors");
    /* the whole file loads: the truncations below are what breaks it */
    ST_ASSERT(write_file(path, buf, n) == 0);
    struct model m;
    int rc = model_load(&m, dir, 0, -1, true, true, err);
    CHECK_MSG(rc == 0, "%s", err);
    if (rc == 0) model_free(&m);
    size_t cuts[] = {0, 1, 7, 8, 9, 8 + hlen / 2, 8 + hlen - 1, 8 + hlen, 8 + hlen + 1, 8 + hlen + (n - 8 - hlen) / 3,
                     n - 4096, n - 1};
    static const char *what[] = {"too short", "too short", "too short", "exceeds", "exceeds", "exceeds", "exceeds",
                                 "outside", "outside", "outside", "outside", "outside"};
    for (size_t i = 0; i < ST_ARRAY_LEN(cuts); i++) {
        char ctx[64];
        snprintf(ctx, sizeof(ctx), "truncated at %zu of %zu", cuts[i], n);
        ST_ASSERT(write_file(path, buf, cuts[i]) == 0);
        expect_error(ctx, open_st(path, err), ST_EFORMAT, err, path, what[i]);
        rc = model_load(&m, dir, 0, -1, true, true, err);
        if (rc == 0) model_free(&m);
        expect_error(ctx, rc, ST_EFORMAT, err, path, what[i]);
    }
    /* a flipped byte inside the header: the JSON breaks or a value changes, never a crash */
    for (size_t off = 8; off < 8 + hlen; off += hlen / 7) {
        char saved = buf[off];
        buf[off] = saved == '"' ? ']' : '"';
        ST_ASSERT(write_file(path, buf, n) == 0);
        rc = open_st(path, err);
        if (rc < 0) CHECK_MSG(strstr(err, path) != NULL, "corrupt byte %zu: message does not name the file: %s", off, err);
        buf[off] = saved;
    }
    free(cfg);
    free(buf);
}

/* ---- models written from generated weights ---- */

#define QWEN3_Q8_CFG \
    "{\"model_type\":\"qwen3\",\"hidden_size\":64,\"intermediate_size\":128,\"num_hidden_layers\":2," \
    "\"num_attention_heads\":2,\"num_key_value_heads\":1,\"head_dim\":32,\"vocab_size\":96,\"rope_theta\":1000000," \
    "\"tie_word_embeddings\":true,\"quantization\":{\"group_size\":64,\"bits\":8}}"

#define LLAMA_BF16_CFG(extra) \
    "{\"model_type\":\"llama\",\"hidden_size\":64,\"intermediate_size\":96,\"num_hidden_layers\":2," \
    "\"num_attention_heads\":4,\"num_key_value_heads\":2,\"vocab_size\":80,\"tie_word_embeddings\":false" extra "}"

enum mut_kind { MUT_DROP, MUT_REPLACE, MUT_ADD };
struct mutation {
    const char *name;
    enum mut_kind kind;
    enum dtype dtype;
    int n_dims;
    int64_t shape[ST_MAX_DIMS];
};

/* Writes dir/config.json and dir/model.safetensors holding src's tensors, changed by the mutations (replaced and
 * added tensors hold arbitrary bytes of the size their shape needs). */
static int write_model(const char *dir, const char *config, const struct safetensors *src, const struct mutation *mu,
                       int n_mu, char *err)
{
    char path[600];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    if (write_file(path, config, strlen(config)) < 0) return err_set(err, ST_EIO, "%s: cannot write", path);
    struct st_writer_entry *e = calloc((size_t)(src->n_tensors + n_mu), sizeof(*e));
    void **bufs = calloc((size_t)n_mu + 1, sizeof(void *));
    int n = 0;
    for (int i = 0; i < src->n_tensors; i++) {
        const struct st_tensor *t = &src->tensors[i];
        const struct mutation *m = NULL;
        for (int k = 0; k < n_mu; k++)
            if (mu[k].kind != MUT_ADD && strcmp(mu[k].name, t->name) == 0) m = &mu[k];
        if (m && m->kind == MUT_DROP) continue;
        e[n].name = t->name;
        e[n].dtype = t->dtype;
        e[n].n_dims = t->n_dims;
        memcpy(e[n].shape, t->shape, sizeof(t->shape));
        e[n].data = t->data;
        e[n].nbytes = t->nbytes;
        n++;
    }
    for (int k = 0; k < n_mu; k++) {
        if (mu[k].kind == MUT_DROP) continue;
        struct st_writer_entry *x = NULL;
        for (int i = 0; i < n && !x; i++)
            if (strcmp(e[i].name, mu[k].name) == 0) x = &e[i];
        if (!x) x = &e[n++];
        size_t count = 1;
        for (int d = 0; d < mu[k].n_dims; d++) count *= (size_t)mu[k].shape[d];
        x->name = (char *)mu[k].name;
        x->dtype = mu[k].dtype;
        x->n_dims = mu[k].n_dims;
        memcpy(x->shape, mu[k].shape, sizeof(x->shape));
        x->nbytes = count * dtype_size(mu[k].dtype);
        uint8_t *b = malloc(x->nbytes + 1);
        for (size_t i = 0; i < x->nbytes; i++) b[i] = (uint8_t)(i * 7 + 0x3c); /* small positive bf16/f32 values */
        bufs[k] = b;
        x->data = b;
    }
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    int rc = safetensors_write(path, e, n, NULL, err);
    for (int k = 0; k < n_mu; k++) free(bufs[k]);
    free(bufs);
    free(e);
    return rc;
}

static int gen_model(struct model *m, const char *config, int bits, uint64_t seed, char *err)
{
    struct model_config c;
    int rc = model_config_parse(&c, config, strlen(config), err);
    if (rc < 0) return rc;
    return model_init_random(m, &c, bits, seed, 0, -1, true, true, err);
}

/* Every tensor `got` holds has the same bytes as the one of that name in `want` (config hashes aside). */
static void same_tensors(const char *ctx, const struct model *want, const struct model *got)
{
    char err[ST_ERR_LEN];
    struct manifest a, b;
    REQUIRE_MSG(manifest_build(&a, want, err) == 0, "%s", err);
    if (manifest_build(&b, got, err) < 0) {
        CHECK_FAIL_("%s", err);
        manifest_free(&a);
        return;
    }
    b.config_hi = a.config_hi;
    b.config_lo = a.config_lo;
    b.tokenizer_hi = b.tokenizer_lo = 0;
    int rc = manifest_compare(&a, &b, err);
    CHECK_MSG(rc == 0, "%s: %s", ctx, err);
    CHECK_MSG(a.n == b.n, "%s: %d tensors vs %d", ctx, a.n, b.n);
    manifest_free(&a);
    manifest_free(&b);
}

/* A model directory that loads, with the same bytes as the generated model; then one change at a time breaks it. */
static void test_model_bind_errors(void)
{
    char err[ST_ERR_LEN];
    struct model g, m;
    int rc = gen_model(&g, QWEN3_Q8_CFG, 8, 5, err);
    REQUIRE_MSG(rc == 0, "%s", err);
    const char *dir = make_dir("q8");
    rc = write_model(dir, QWEN3_Q8_CFG, &g.st, NULL, 0, err);
    REQUIRE_MSG(rc == 0, "%s", err);
    rc = model_load(&m, dir, 0, -1, true, true, err);
    REQUIRE_MSG(rc == 0, "the unchanged model does not load: %s", err);
    CHECK(m.layers[1].w_up.type == WT_Q8 && m.layers[1].w_up.group_size == 64);
    CHECK(m.lm_head.data == m.embed.data);
    same_tensors("written q8 model", &g, &m);
    model_free(&m);

    static const struct {
        struct mutation mu;
        const char *what;
        int code;
    } cases[] = {
        {{"model.layers.1.mlp.up_proj.weight", MUT_DROP}, "missing tensor model.layers.1.mlp.up_proj.weight", ST_EFORMAT},
        {{"model.layers.0.input_layernorm.weight", MUT_DROP}, "model.layers.0.input_layernorm.weight", ST_EFORMAT},
        {{"model.layers.1.self_attn.k_norm.weight", MUT_DROP}, "model.layers.1.self_attn.k_norm.weight", ST_EFORMAT},
        {{"model.norm.weight", MUT_DROP}, "model.norm.weight", ST_EFORMAT},
        {{"model.embed_tokens.biases", MUT_DROP}, "model.embed_tokens.biases", ST_EFORMAT},
        {{"model.layers.0.self_attn.k_proj.biases", MUT_DROP}, "model.layers.0.self_attn.k_proj.biases", ST_EFORMAT},
        /* 64 columns in 12 words: 6 bits */
        {{"model.layers.0.mlp.gate_proj.weight", MUT_REPLACE, DT_U32, 2, {128, 12}}, "6 bits", ST_EUNSUPPORTED},
        /* 64 columns in 7 words: not a whole number of bits */
        {{"model.layers.0.mlp.gate_proj.weight", MUT_REPLACE, DT_U32, 2, {128, 7}}, "do not fit", ST_EFORMAT},
        {{"model.layers.0.mlp.gate_proj.weight", MUT_REPLACE, DT_F32, 2, {128, 16}}, "U32", ST_EFORMAT},
        {{"model.layers.0.mlp.gate_proj.weight", MUT_REPLACE, DT_U32, 2, {127, 16}}, "U32", ST_EFORMAT},
        /* group size 16 (scales [rows][4]) */
        {{"model.layers.0.mlp.down_proj.scales", MUT_REPLACE, DT_BF16, 2, {64, 8}}, "group size 16", ST_EUNSUPPORTED},
        {{"model.layers.0.mlp.down_proj.scales", MUT_REPLACE, DT_BF16, 2, {64, 3}}, "scales", ST_EFORMAT},
        {{"model.layers.0.mlp.down_proj.biases", MUT_REPLACE, DT_BF16, 2, {64, 1}}, "biases", ST_EFORMAT},
        {{"model.layers.0.mlp.down_proj.biases", MUT_REPLACE, DT_F32, 2, {64, 2}}, "biases", ST_EFORMAT},
        {{"model.layers.0.mlp.down_proj.scales", MUT_REPLACE, DT_I32, 2, {64, 2}}, "scales", ST_EFORMAT},
        {{"model.layers.0.post_attention_layernorm.weight", MUT_REPLACE, DT_I32, 1, {64}}, "post_attention_layernorm", ST_EFORMAT},
        {{"model.layers.0.self_attn.q_norm.weight", MUT_REPLACE, DT_BF16, 1, {64}}, "q_norm", ST_EFORMAT},
        {{"model.norm.weight", MUT_REPLACE, DT_BF16, 2, {1, 64}}, "model.norm.weight", ST_EFORMAT},
    };
    for (size_t i = 0; i < ST_ARRAY_LEN(cases); i++) {
        char ctx[160];
        snprintf(ctx, sizeof(ctx), "case %zu (%s)", i, cases[i].mu.name);
        const char *d = make_dir("q8-mut");
        rc = write_model(d, QWEN3_Q8_CFG, &g.st, &cases[i].mu, 1, err);
        REQUIRE_MSG(rc == 0, "%s", err);
        rc = model_load(&m, d, 0, -1, true, true, err);
        if (rc == 0) model_free(&m);
        expect_error(ctx, rc, cases[i].code, err, d, cases[i].what);
    }
    /* a stage that does not hold the broken layer loads */
    struct mutation drop = {"model.layers.1.mlp.up_proj.weight", MUT_DROP};
    const char *d = make_dir("q8-mut");
    REQUIRE(write_model(d, QWEN3_Q8_CFG, &g.st, &drop, 1, err) == 0);
    rc = model_load(&m, d, 0, 1, true, false, err);
    CHECK_MSG(rc == 0, "layer 0 alone: %s", err);
    if (rc == 0) model_free(&m);
    /* layer ranges outside the model */
    rc = model_load(&m, dir, 1, 3, false, true, err);
    expect_error("layers [1, 3)", rc, ST_EINVAL, err, NULL, "layer range");
    rc = model_load(&m, dir, 2, 1, false, true, err);
    expect_error("layers [2, 1)", rc, ST_EINVAL, err, NULL, "layer range");
    model_free(&g);
}

static void test_model_bind_dense(void)
{
    char err[ST_ERR_LEN];
    struct model g, m;
    const char *cfg = LLAMA_BF16_CFG("");
    int rc = gen_model(&g, cfg, 0, 9, err);
    REQUIRE_MSG(rc == 0, "%s", err);
    const char *dir = make_dir("bf16");
    REQUIRE_MSG(write_model(dir, cfg, &g.st, NULL, 0, err) == 0, "%s", err);
    rc = model_load(&m, dir, 0, -1, true, true, err);
    REQUIRE_MSG(rc == 0, "%s", err);
    CHECK(m.lm_head.data != m.embed.data);
    CHECK(m.layers[0].wq.type == WT_BF16);
    same_tensors("written bf16 model", &g, &m);
    model_free(&m);
    static const struct {
        struct mutation mu;
        const char *what;
    } cases[] = {
        {{"lm_head.weight", MUT_DROP}, "missing tensor lm_head.weight"},
        {{"model.layers.0.self_attn.k_proj.weight", MUT_REPLACE, DT_BF16, 2, {64, 32}}, "has shape [64, 32]"},
        {{"model.layers.0.self_attn.o_proj.weight", MUT_REPLACE, DT_BF16, 1, {4096}}, "o_proj"},
        {{"model.layers.1.mlp.down_proj.weight", MUT_REPLACE, DT_I8, 2, {64, 96}}, "dtype I8"},
        {{"model.embed_tokens.weight", MUT_REPLACE, DT_BF16, 2, {79, 64}}, "embed_tokens"},
        /* scales without biases on a dense weight */
        {{"model.layers.0.mlp.up_proj.scales", MUT_ADD, DT_BF16, 2, {96, 1}}, "biases"},
    };
    for (size_t i = 0; i < ST_ARRAY_LEN(cases); i++) {
        const char *d = make_dir("bf16-mut");
        REQUIRE_MSG(write_model(d, cfg, &g.st, &cases[i].mu, 1, err) == 0, "%s", err);
        rc = model_load(&m, d, 0, -1, true, true, err);
        if (rc == 0) model_free(&m);
        expect_error(cases[i].mu.name, rc, 0, err, d, cases[i].what);
    }
    model_free(&g);
}

/* Llama's attention_bias also puts a bias on o_proj, and mlp_bias on gate/up/down (transformers' LlamaAttention /
 * LlamaMLP): a loader must either use those tensors or refuse the model, never drop them silently. */
static void test_model_llama_biases_not_dropped(void)
{
    char err[ST_ERR_LEN];
    struct model g, m;
    /* the weights of the plain model, plus the bias tensors transformers would create for the flag */
    int rc = gen_model(&g, LLAMA_BF16_CFG(""), 0, 11, err);
    REQUIRE_MSG(rc == 0, "%s", err);
    static const struct {
        const char *cfg, *flag, *checked;
        const char *suffix[4];
        int64_t len[4];
    } cases[] = {
        {LLAMA_BF16_CFG(",\"attention_bias\":true"), "attention_bias", "model.layers.0.self_attn.o_proj.bias",
         {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.bias"},
         {64, 32, 32, 64}},
        {LLAMA_BF16_CFG(",\"mlp_bias\":true"), "mlp_bias", "model.layers.0.mlp.down_proj.bias",
         {"mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias", NULL}, {96, 96, 64, 0}},
    };
    for (size_t i = 0; i < ST_ARRAY_LEN(cases); i++) {
        char names[8][96];
        struct mutation mu[8];
        int n_mu = 0;
        for (int l = 0; l < 2; l++)
            for (int k = 0; k < 4 && cases[i].suffix[k]; k++) {
                snprintf(names[n_mu], sizeof(names[0]), "model.layers.%d.%s", l, cases[i].suffix[k]);
                mu[n_mu] = (struct mutation){names[n_mu], MUT_ADD, DT_BF16, 1, {cases[i].len[k]}};
                n_mu++;
            }
        const char *d = make_dir(cases[i].flag);
        REQUIRE_MSG(write_model(d, cases[i].cfg, &g.st, mu, n_mu, err) == 0, "%s", err);
        rc = model_load(&m, d, 0, -1, true, true, err);
        if (rc == 0) {
            bool held = false;
            for (int k = 0; k < m.n_held; k++) held |= strcmp(m.held[k].name, cases[i].checked) == 0;
            CHECK_MSG(held, "%s loads but %s is ignored: the output would silently differ from "
                      "transformers", cases[i].flag, cases[i].checked);
            model_free(&m);
        } else {
            expect_error(cases[i].flag, rc, 0, err, d, cases[i].flag);
        }
    }
    model_free(&g);
}

/* ---- sharded checkpoints ---- */

static void test_sharded_errors(void)
{
    char err[ST_ERR_LEN];
    struct safetensors st;
    float data[4] = {1, 2, 3, 4};
    const char *dir = make_dir("shards");
    write_st(tmp_path("shards/a.safetensors"), "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", data, 8);
    write_st(tmp_path("shards/b.safetensors"), "{\"y\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", data + 2, 8);
    write_st(tmp_path("shards/c.safetensors"), "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", data, 4);
    const char *index = tmp_path("shards/model.safetensors.index.json");
#define INDEX(text) ST_ASSERT(write_file(index, text, strlen(text)) == 0)
    INDEX("{\"metadata\":{},\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"b.safetensors\"}}");
    int rc = safetensors_open(&st, dir, err);
    REQUIRE_MSG(rc == 0, "%s", err);
    CHECK_EQ_INT(st.n_files, 2);
    const struct st_tensor *y = safetensors_find(&st, "y");
    CHECK(y && y->file == 1 && ((const float *)y->data)[1] == 4.0f);
    safetensors_free(&st);

    INDEX("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"missing.safetensors\"}}");
    expect_error("missing shard", safetensors_open(&st, dir, err), ST_EIO, err, "missing.safetensors", "No such file");
    INDEX("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"../shards/b.safetensors\"}}");
    expect_error("shard with ..", safetensors_open(&st, dir, err), ST_EFORMAT, err, index, "shard file name");
    INDEX("{\"weight_map\":{\"x\":\"/etc/passwd\"}}");
    expect_error("absolute shard", safetensors_open(&st, dir, err), ST_EFORMAT, err, index, "shard file name");
    INDEX("{\"weight_map\":{\"x\":\"sub/a.safetensors\"}}");
    expect_error("shard in a subdirectory", safetensors_open(&st, dir, err), ST_EFORMAT, err, index, "shard file name");
    INDEX("{\"weight_map\":{\"x\":\"..\"}}");
    expect_error("shard ..", safetensors_open(&st, dir, err), ST_EFORMAT, err, index, "shard file name");
    INDEX("{\"weight_map\":{\"x\":\"\"}}");
    expect_error("empty shard name", safetensors_open(&st, dir, err), ST_EFORMAT, err, index, "shard file name");
    INDEX("{\"weight_map\":{\"x\":7}}");
    expect_error("shard name not a string", safetensors_open(&st, dir, err), ST_EFORMAT, err, index, "shard file name");
    INDEX("{\"weight_map\":{\"x\":\"a.safetensors\",\"z\":\"b.safetensors\"}}");
    expect_error("tensor not in its shard", safetensors_open(&st, dir, err), ST_EFORMAT, err, index, "\"z\"");
    INDEX("{\"weight_map\":[\"a.safetensors\"]}");
    expect_error("weight_map not an object", safetensors_open(&st, dir, err), ST_EFORMAT, err, index, "weight_map");
    INDEX("{\"weight_map\":");
    expect_error("index not JSON", safetensors_open(&st, dir, err), ST_EFORMAT, err, index, "weight_map");
    /* the same tensor in two shards: the message must say which files */
    INDEX("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"b.safetensors\",\"x2\":\"c.safetensors\"}}");
    rc = safetensors_open(&st, dir, err);
    if (rc == 0) safetensors_free(&st);
    expect_error("tensor in two shards", rc, ST_EFORMAT, err, NULL, "twice");
    CHECK_MSG(rc >= 0 || strstr(err, "c.safetensors") || strstr(err, "a.safetensors"),
              "a tensor in two shards must be reported naming the files: \"%s\"", err);
    /* a corrupt shard is named */
    ST_ASSERT(write_file(tmp_path("shards/b.safetensors"), "\x08\0\0\0\0\0\0\0{\"y\":1} ", 16) == 0);
    INDEX("{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"b.safetensors\"}}");
    expect_error("corrupt shard", safetensors_open(&st, dir, err), ST_EFORMAT, err, "b.safetensors", "\"y\"");
#undef INDEX
    /* no weights at all */
    expect_error("no model files", safetensors_open(&st, make_dir("no-weights"), err), ST_EIO, err, "model.safetensors",
                 NULL);
}

/* ---- generated weights and the manifest ---- */

static void test_init_random_manifest(void)
{
    char err[ST_ERR_LEN];
    static const char *cfgs[] = {
        QWEN3_Q8_CFG,
        "{\"model_type\":\"qwen2\",\"hidden_size\":128,\"intermediate_size\":192,\"num_hidden_layers\":3,"
        "\"num_attention_heads\":4,\"num_key_value_heads\":2,\"vocab_size\":70,\"tie_word_embeddings\":false}",
    };
    static const int bits[] = {0, 4, 8};
    for (size_t ci = 0; ci < ST_ARRAY_LEN(cfgs); ci++) {
        struct model_config c;
        REQUIRE(model_config_parse(&c, cfgs[ci], strlen(cfgs[ci]), err) == 0);
        for (size_t bi = 0; bi < ST_ARRAY_LEN(bits); bi++) {
            struct model a, b, other;
            struct manifest ma, mb, mo;
            int rc = model_init_random(&a, &c, bits[bi], 77, 0, -1, true, true, err);
            REQUIRE_MSG(rc == 0, "%s", err);
            REQUIRE(model_init_random(&b, &c, bits[bi], 77, 0, -1, true, true, err) == 0);
            REQUIRE(model_init_random(&other, &c, bits[bi], 78, 0, -1, true, true, err) == 0);
            enum wtype want = bits[bi] == 8 ? WT_Q8 : bits[bi] == 4 ? WT_Q4 : WT_BF16;
            CHECK_MSG(a.layers[0].wq.type == want, "bits %d: wq is %s", bits[bi], wtype_name(a.layers[0].wq.type));
            CHECK_MSG(a.cfg.q_bits == bits[bi] && a.cfg.q_group_size == (bits[bi] ? 64 : 0),
                      "generated %d-bit weights must report their own quantization, not q_bits %d, group %d (config: %d bits)",
                      bits[bi], a.cfg.q_bits, a.cfg.q_group_size, c.q_bits);
            REQUIRE(manifest_build(&ma, &a, err) == 0);
            REQUIRE(manifest_build(&mb, &b, err) == 0);
            REQUIRE(manifest_build(&mo, &other, err) == 0);
            /* same seed: the same bytes, tensor for tensor */
            CHECK_EQ_INT(ma.n, mb.n);
            CHECK_EQ_INT(ma.n, a.n_held);
            for (int i = 0; i < ma.n && i < mb.n; i++) {
                CHECK_STR(ma.entries[i].name, mb.entries[i].name);
                CHECK(ma.entries[i].hash_hi == mb.entries[i].hash_hi && ma.entries[i].hash_lo == mb.entries[i].hash_lo);
                CHECK(ma.entries[i].nbytes == mb.entries[i].nbytes && ma.entries[i].nbytes > 0);
                if (i > 0) CHECK(strcmp(ma.entries[i - 1].name, ma.entries[i].name) < 0);
            }
            for (int i = 0; i < a.n_held; i++)
                CHECK_MSG(memcmp(a.held[i].data, b.held[i].data, a.held[i].nbytes) == 0, "%s differs", a.held[i].name);
            rc = manifest_compare(&ma, &mb, err);
            CHECK_MSG(rc == 0, "%s", err);
            /* another seed: other bytes */
            rc = manifest_compare(&ma, &mo, err);
            CHECK_EQ_INT(rc, ST_EMISMATCH);
            /* a layer sub-range built alone holds the same bytes as those tensors of the whole model */
            struct {
                int begin, end;
                bool embed, head;
            } ranges[] = {{1, 2, false, true}, {0, 1, true, false}, {1, -1, false, true}, {0, 0, true, false}};
            for (size_t r = 0; r < ST_ARRAY_LEN(ranges); r++) {
                struct model s;
                struct manifest ms;
                rc = model_init_random(&s, &c, bits[bi], 77, ranges[r].begin, ranges[r].end, ranges[r].embed,
                                       ranges[r].head, err);
                REQUIRE_MSG(rc == 0, "%s", err);
                REQUIRE(manifest_build(&ms, &s, err) == 0);
                rc = manifest_compare(&ma, &ms, err);
                CHECK_MSG(rc == 0, "range %zu: %s", r, err);
                CHECK(ms.n > 0 && ms.n < ma.n);
                /* exactly the tensors of its layers (and the embedding / head it was asked for) */
                for (int i = 0; i < ms.n; i++) {
                    int l = -1;
                    const char *nm = ms.entries[i].name;
                    if (sscanf(nm, "model.layers.%d.", &l) == 1)
                        CHECK_MSG(l >= s.layer_begin && l < s.layer_end, "range %zu holds %s", r, nm);
                    if (strncmp(nm, "model.embed_tokens", 18) == 0)
                        CHECK_MSG(ranges[r].embed || (ranges[r].head && c.tie_embeddings), "range %zu holds %s", r, nm);
                    if (strncmp(nm, "lm_head", 7) == 0 || strcmp(nm, "model.norm.weight") == 0)
                        CHECK_MSG(ranges[r].head, "range %zu holds %s", r, nm);
                }
                manifest_free(&ms);
                model_free(&s);
            }
            /* one changed tensor is named, with both hashes */
            struct model n;
            REQUIRE(model_init_random(&n, &c, bits[bi], 77, 1, 2, false, false, err) == 0);
            int victim = n.n_held / 2;
            ((uint8_t *)(uintptr_t)n.held[victim].data)[n.held[victim].nbytes / 2] ^= 0x40;
            struct manifest mn;
            REQUIRE(manifest_build(&mn, &n, err) == 0);
            err[0] = 0;
            rc = manifest_compare(&ma, &mn, err);
            CHECK_EQ_INT(rc, ST_EMISMATCH);
            const struct manifest_entry *want_e = NULL, *got_e = NULL;
            for (int i = 0; i < ma.n; i++)
                if (strcmp(ma.entries[i].name, n.held[victim].name) == 0) want_e = &ma.entries[i];
            for (int i = 0; i < mn.n; i++)
                if (strcmp(mn.entries[i].name, n.held[victim].name) == 0) got_e = &mn.entries[i];
            REQUIRE(want_e && got_e);
            char expect[ST_ERR_LEN];
            snprintf(expect, sizeof(expect), "tensor %s: %016" PRIx64 "%016" PRIx64 " (node) != %016" PRIx64 "%016" PRIx64
                     " (coordinator)", got_e->name, got_e->hash_hi, got_e->hash_lo, want_e->hash_hi, want_e->hash_lo);
            CHECK_STR(err, expect);
            manifest_free(&mn);
            model_free(&n);
            manifest_free(&ma);
            manifest_free(&mb);
            manifest_free(&mo);
            model_free(&a);
            model_free(&b);
            model_free(&other);
        }
    }
    /* bad arguments */
    struct model_config c;
    struct model m;
    REQUIRE(model_config_parse(&c, QWEN3_Q8_CFG, strlen(QWEN3_Q8_CFG), err) == 0);
    expect_error("bits 3", model_init_random(&m, &c, 3, 1, 0, -1, true, true, err), ST_EINVAL, err, NULL, "bits");
    c.hidden_dim = 96;
    expect_error("hidden 96 at 8 bits", model_init_random(&m, &c, 8, 1, 0, -1, true, true, err), ST_EINVAL, err, NULL,
                 "multiples of 64");
    CHECK(model_init_random(&m, &c, 0, 1, 0, -1, true, true, err) == 0); /* bf16 takes any shape */
    model_free(&m);
    c.hidden_dim = 128;
    expect_error("layers [0, 3)", model_init_random(&m, &c, 0, 1, 0, 3, true, true, err), ST_EINVAL, err, NULL,
                 "layer range");
}

/* manifest_compare: config and tokenizer hashes, and tensors unknown to the coordinator. */
static void test_manifest_compare_rules(void)
{
    char err[ST_ERR_LEN];
    struct model_config c;
    struct model a, s;
    struct manifest ma, ms;
    REQUIRE(model_config_parse(&c, QWEN3_Q8_CFG, strlen(QWEN3_Q8_CFG), err) == 0);
    REQUIRE(model_init_random(&a, &c, 8, 3, 0, 1, true, false, err) == 0);
    REQUIRE(model_init_random(&s, &c, 8, 3, 1, 2, false, true, err) == 0);
    REQUIRE(manifest_build(&ma, &a, err) == 0);
    REQUIRE(manifest_build(&ms, &s, err) == 0);
    /* the coordinator knows layer 0 only: layer 1 is unknown */
    int rc = manifest_compare(&ma, &ms, err);
    CHECK_EQ_INT(rc, ST_EMISMATCH);
    CHECK_MSG(strstr(err, "model.layers.1.") && strstr(err, "unknown"), "%s", err);
    /* a different config */
    struct manifest copy = ma;
    copy.config_lo ^= 1;
    rc = manifest_compare(&ma, &copy, err);
    CHECK_EQ_INT(rc, ST_EMISMATCH);
    CHECK_MSG(strstr(err, "config.json") && strstr(err, "(node)") && strstr(err, "(coordinator)"), "%s", err);
    copy.config_lo ^= 1;
    copy.tokenizer_hi = 5;
    ma.tokenizer_hi = 6;
    rc = manifest_compare(&ma, &copy, err);
    CHECK_EQ_INT(rc, ST_EMISMATCH);
    CHECK_MSG(strstr(err, "tokenizer.json") != NULL, "%s", err);
    ma.tokenizer_hi = 0;
    /* JSON form lists every tensor */
    char *js = manifest_to_json(&ma);
    REQUIRE(js);
    json_t *root = json_loads(js, 0, NULL);
    CHECK(json_is_object(json_object_get(root, "tensors")));
    CHECK_EQ_INT(json_object_size(json_object_get(root, "tensors")), ma.n);
    CHECK_EQ_INT(json_integer_value(json_object_get(root, "n_tensors")), ma.n);
    json_decref(root);
    free(js);
    manifest_free(&ma);
    manifest_free(&ms);
    model_free(&a);
    model_free(&s);
}

/* ---- writer ---- */

static void test_st_write_roundtrip(void)
{
    char err[ST_ERR_LEN];
    struct rng r;
    rng_seed(&r, 1234);
    float f32[6];
    uint16_t b16[5];
    uint32_t u32[4];
    int64_t i64 = -1234567890123ll;
    uint8_t u8[3] = {1, 2, 3};
    for (int i = 0; i < 6; i++) f32[i] = rng_range(&r, -2, 2);
    for (int i = 0; i < 5; i++) b16[i] = f32_to_bf16(rng_range(&r, -2, 2));
    for (int i = 0; i < 4; i++) u32[i] = (uint32_t)rng_next(&r);
    struct st_writer_entry e[] = {
        {"z.f32", DT_F32, 2, {2, 3}, f32, sizeof(f32)},
        {"a.u8", DT_U8, 1, {3}, u8, sizeof(u8)},   /* sorts first: leaves the next tensors misaligned in the file */
        {"b.bf16", DT_BF16, 1, {5}, b16, sizeof(b16)},
        {"c.u32", DT_U32, 3, {1, 2, 2}, u32, sizeof(u32)},
        {"d.scalar", DT_I64, 0, {0}, &i64, sizeof(i64)},
        {"e.empty", DT_F16, 2, {0, 7}, NULL, 0},
    };
    const char *p = tmp_path("written.safetensors");
    int rc = safetensors_write(p, e, (int)ST_ARRAY_LEN(e), "{\"format\":\"pt\",\"note\":\"round trip\"}", err);
    REQUIRE_MSG(rc == 0, "%s", err);
    /* the file: header length a multiple of 8, keys sorted */
    char *raw = NULL;
    size_t n = 0;
    REQUIRE(file_read_all(p, &raw, &n, 1 << 20, err) == 0);
    uint64_t hl = 0;
    for (int i = 0; i < 8; i++) hl |= (uint64_t)(uint8_t)raw[i] << (8 * i);
    CHECK_EQ_INT(hl % 8, 0);
    CHECK(8 + hl <= n);
    CHECK_EQ_INT(n - 8 - hl, 3 + sizeof(b16) + sizeof(u32) + 8 + 0 + sizeof(f32));
    json_t *hdr = json_loadb(raw + 8, (size_t)hl, 0, NULL);
    CHECK(json_is_object(hdr));
    CHECK_STR(json_string_value(json_object_get(json_object_get(hdr, "__metadata__"), "note")), "round trip");
    json_decref(hdr);
    free(raw);
    struct safetensors st;
    rc = safetensors_open_file(&st, p, err);
    REQUIRE_MSG(rc == 0, "%s", err);
    CHECK_EQ_INT(st.n_tensors, ST_ARRAY_LEN(e));
    for (size_t i = 0; i < ST_ARRAY_LEN(e); i++) {
        const struct st_tensor *t = safetensors_find(&st, e[i].name);
        CHECK_MSG(t != NULL, "%s missing", e[i].name);
        if (!t) continue;
        CHECK(t->dtype == e[i].dtype);
        CHECK_EQ_INT(t->n_dims, e[i].n_dims);
        for (int d = 0; d < e[i].n_dims; d++) CHECK_EQ_INT(t->shape[d], e[i].shape[d]);
        CHECK_EQ_INT(t->nbytes, e[i].nbytes);
        if (e[i].nbytes) CHECK_MSG(memcmp(t->data, e[i].data, e[i].nbytes) == 0, "%s bytes differ", e[i].name);
        CHECK_MSG((uintptr_t)t->data % dtype_size(t->dtype) == 0, "%s is misaligned", e[i].name);
    }
    safetensors_free(&st);
    /* bad metadata, unwritable path */
    const char *q = tmp_path("bad-metadata.safetensors");
    rc = safetensors_write(q, e, 1, "[1]", err);
    expect_error("metadata not an object", rc, ST_EINVAL, err, NULL, "metadata");
    CHECK(!file_exists(q));
    q = tmp_path("no-such-dir/x.safetensors");
    rc = safetensors_write(q, e, 1, NULL, err);
    expect_error("unwritable path", rc, ST_EIO, err, "no-such-dir/x.safetensors", NULL);
    /* zero tensors */
    q = tmp_path("none.safetensors");
    rc = safetensors_write(q, e, 0, NULL, err);
    REQUIRE_MSG(rc == 0, "%s", err);
    rc = safetensors_open_file(&st, q, err);
    CHECK_MSG(rc == 0 && st.n_tensors == 0, "%s", err);
    if (rc == 0) safetensors_free(&st);
}

/* dtype names, sizes and bf16 / f16 conversions */
static void test_dtypes(void)
{
    for (int t = 0; t < DT_COUNT; t++) {
        CHECK_EQ_INT(dtype_parse(dtype_name((enum dtype)t)), t);
        CHECK(dtype_size((enum dtype)t) >= 1 && dtype_size((enum dtype)t) <= 8);
    }
    CHECK_EQ_INT(dtype_parse("f32"), -1);
    CHECK_EQ_INT(dtype_parse(""), -1);
    CHECK_EQ_INT(dtype_size(DT_BF16), 2);
    CHECK_EQ_INT(f32_to_bf16(1.0f), 0x3f80);
    CHECK_EQ_INT(f32_to_bf16(1.00390625f), 0x3f80);  /* halfway: to even */
    CHECK_EQ_INT(f32_to_bf16(1.01171875f), 0x3f82);  /* halfway: to even (up) */
    CHECK_EQ_INT(f32_to_f16(1.0f), 0x3c00);
    CHECK_EQ_INT(f32_to_f16(65504.0f), 0x7bff);
    CHECK_EQ_INT(f32_to_f16(1e6f), 0x7c00);
    CHECK_NEAR(f16_to_f32(0x0001), 5.960464477539063e-08, 0);
    CHECK_NEAR(f16_to_f32(0xc000), -2.0, 0);
    struct rng r;
    rng_seed(&r, 99);
    for (int i = 0; i < 10000; i++) {
        uint16_t h = (uint16_t)rng_next(&r);
        if ((h & 0x7c00) == 0x7c00) continue; /* inf / nan */
        CHECK_EQ_INT(f32_to_f16(f16_to_f32(h)), h);
        CHECK_EQ_INT(f32_to_bf16(bf16_to_f32(h)), h);
    }
}

/* ---- main ---- */

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    return remove(path);
}

int main(void)
{
    snprintf(tmp_root, sizeof(tmp_root), "/tmp/strata-test-model-XXXXXX");
    if (!mkdtemp(tmp_root)) {
        perror("mkdtemp");
        return 1;
    }
    RUN(test_config_classic);
    RUN(test_config_new_form);
    RUN(test_config_defaults);
    RUN(test_config_eos);
    RUN(test_config_unsupported);
    RUN(test_config_bad_values);
    RUN(test_st_malformed);
    RUN(test_st_valid_edges);
    RUN(test_st_truncated);
    RUN(test_model_bind_errors);
    RUN(test_model_bind_dense);
    RUN(test_model_llama_biases_not_dropped);
    RUN(test_sharded_errors);
    RUN(test_init_random_manifest);
    RUN(test_manifest_compare_rules);
    RUN(test_st_write_roundtrip);
    RUN(test_dtypes);
    if (!getenv("KEEP_TMP")) nftw(tmp_root, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    return check_done();
}
