#include "check.h"
#include "model/model.h"
#include "core/core.h"
/* manifest_build_random (one layer at a time) equals the manifest of the whole generated model. */
static void test_random_manifest(void)
{
    char err[ST_ERR_LEN];
    struct model_config c;
    const char *js = "{\"model_type\":\"qwen3\",\"hidden_size\":128,\"intermediate_size\":256,\"num_hidden_layers\":3,\"num_attention_heads\":4,\"num_key_value_heads\":2,\"head_dim\":32,\"vocab_size\":300,\"tie_word_embeddings\":true}";
    REQUIRE(model_config_parse(&c, js, strlen(js), err) == 0);
    for (int bits = 0; bits <= 8; bits += 4) {
        struct model m;
        REQUIRE(model_init_random(&m, &c, bits, 7, 0, -1, true, true, err) == 0);
        struct manifest a, b;
        REQUIRE(manifest_build(&a, &m, err) == 0);
        REQUIRE(manifest_build_random(&b, &c, bits, 7, err) == 0);
        CHECK_EQ_INT(a.n, b.n);
        CHECK(manifest_compare(&a, &b, err) == 0);
        CHECK(manifest_compare(&b, &a, err) == 0);
        manifest_free(&a); manifest_free(&b); model_free(&m);
    }
}
int main(void){ RUN(test_random_manifest); return check_done(); }
