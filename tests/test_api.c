/* Server API layer without a network: request parsing and validation (a table of bad requests, each with its
 * status, field and message), prompt building against the fixture tokenizer and chat template, response and
 * stream chunk shapes, the stop-string / reasoning text processor (fixed cases and a seeded random comparison
 * with a direct reference), and the Prometheus rendering. */
#include <jansson.h>

#include "check.h"
#include "core/core.h"
#include "server/server.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

static const struct api_limits LIM = {"kjv", 1000, 128, 20};

static int parse(struct api_request *r, enum api_kind k, const char *body, struct api_error *e)
{
    return api_request_parse(r, k, body, strlen(body), &LIM, e);
}

/* ---- bad requests ---- */

struct bad_case {
    enum api_kind kind;
    const char *body;
    int status;
    const char *param;   /* expected "param" ("" for none) */
    const char *needle;  /* expected in the message */
};

static const struct bad_case bad_cases[] = {
    {API_CHAT, "", 400, "", "body is empty"},
    {API_CHAT, "{\"messages\": [", 400, "", "invalid JSON"},
    {API_CHAT, "[1, 2]", 400, "", "must be a JSON object"},
    {API_CHAT, "{\"messages\": [], \"model\": \"kjv\"}", 400, "messages", "must not be empty"},
    {API_CHAT, "{\"model\": \"kjv\"}", 400, "messages", "'messages' is required"},
    {API_CHAT, "{\"messages\": \"hi\"}", 400, "messages", "must be an array"},
    {API_CHAT, "{\"messages\": [42]}", 400, "messages[0]", "must be an object"},
    {API_CHAT, "{\"messages\": [{\"content\": \"x\"}]}", 400, "messages[0].role", "is required"},
    {API_CHAT, "{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}", 400, "messages[0].role", "unknown role \"robot\""},
    {API_CHAT, "{\"messages\": [{\"role\": 7, \"content\": \"x\"}]}", 400, "messages[0].role", "must be a string"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\"}]}", 400, "messages[0].content", "is missing"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": 5}]}", 400, "messages[0].content", "must be a string or an array"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image_url\", \"image_url\": {}}]}]}", 400,
     "messages[0].content", "not supported"},
    {API_CHAT, "{\"model\": \"gpt-4\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}", 404, "model", "`gpt-4` does not exist"},
    {API_CHAT, "{\"model\": 3, \"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}", 400, "model", "must be a string"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"n\": 2}", 400, "n", "'n' must be 1"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"max_tokens\": 0}", 400, "max_tokens", "between 1 and"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"max_tokens\": \"9\"}", 400, "max_tokens", "must be an integer"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"max_tokens\": 2.5}", 400, "max_tokens", "must be an integer"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"temperature\": -1}", 400, "temperature", "between 0 and"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"temperature\": \"hot\"}", 400, "temperature", "must be a number"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"top_p\": 0}", 400, "top_p", "(0, 1]"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"top_p\": 1.5}", 400, "top_p", "between 0 and 1"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"presence_penalty\": 3}", 400, "presence_penalty", "between -2 and 2"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"frequency_penalty\": -2.5}", 400, "frequency_penalty", "between -2 and 2"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"min_p\": 2}", 400, "min_p", "between 0 and 1"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"repetition_penalty\": 0}", 400, "repetition_penalty", "(0, 100]"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"top_k\": -5}", 400, "top_k", "between -1 and"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"stream\": \"yes\"}", 400, "stream", "must be a boolean"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"stream_options\": {\"include_usage\": true}}", 400,
     "stream_options", "only allowed when 'stream' is true"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"stream\": true, \"stream_options\": {\"include_usage\": 1}}", 400,
     "stream_options.include_usage", "must be a boolean"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"logit_bias\": {\"abc\": 1}}", 400, "logit_bias", "not a token id"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"logit_bias\": {\"5000\": 1}}", 400, "logit_bias", "outside the vocabulary"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"logit_bias\": {\"5\": 101}}", 400, "logit_bias", "between -100 and 100"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"logit_bias\": {\"-1\": 1}}", 400, "logit_bias", "outside the vocabulary"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"logit_bias\": [1]}", 400, "logit_bias", "must be an object"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"top_logprobs\": 3}", 400, "top_logprobs", "needs 'logprobs'"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"logprobs\": true, \"top_logprobs\": 21}", 400, "top_logprobs", "between 0 and 20"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"stop\": 5}", 400, "stop", "string or an array"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"stop\": [\"a\", 1]}", 400, "stop", "must be a string"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"stop\": [\"\"]}", 400, "stop", "must not be empty"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"stop_token_ids\": [1, 99999]}", 400, "stop_token_ids", "outside the vocabulary"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"response_format\": {\"type\": \"json_object\"}}", 400,
     "response_format", "not supported"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tool_choice\": \"required\"}", 400, "tool_choice", "\"auto\" or \"none\""},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": {}}", 400, "tools", "must be an array"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"chat_template_kwargs\": 1}", 400, "chat_template_kwargs", "must be an object"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"chat_template_kwargs\": {\"enable_thinking\": \"no\"}}", 400,
     "chat_template_kwargs.enable_thinking", "must be a boolean"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"seed\": \"s\"}", 400, "seed", "must be an integer"},
    {API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"messages\": []}", 400, "", "duplicate"},
    {API_COMPLETION, "{\"model\": \"kjv\"}", 400, "prompt", "'prompt' is required"},
    {API_COMPLETION, "{\"prompt\": \"\"}", 400, "prompt", "must not be empty"},
    {API_COMPLETION, "{\"prompt\": []}", 400, "prompt", "must not be empty"},
    {API_COMPLETION, "{\"prompt\": 12}", 400, "prompt", "string or an array"},
    {API_COMPLETION, "{\"prompt\": [1, 2, 1000]}", 400, "prompt", "outside the vocabulary"},
    {API_COMPLETION, "{\"prompt\": [1, \"a\"]}", 400, "prompt", "must be an integer token id"},
    {API_COMPLETION, "{\"prompt\": [[1, 2], [3]]}", 400, "prompt", "batched prompts"},
    {API_COMPLETION, "{\"prompt\": [\"a\", \"b\"]}", 400, "prompt", "batched prompts"},
    {API_COMPLETION, "{\"prompt\": \"x\", \"logprobs\": true}", 400, "logprobs", "must be an integer"},
    {API_COMPLETION, "{\"prompt\": \"x\", \"logprobs\": 25}", 400, "logprobs", "between 0 and 20"},
    {API_COMPLETION, "{\"prompt\": \"x\", \"echo\": true}", 400, "echo", "not supported"},
    {API_COMPLETION, "{\"prompt\": \"x\", \"suffix\": \"y\"}", 400, "suffix", "not supported"},
    {API_COMPLETION, "{\"prompt\": \"x\", \"best_of\": 3}", 400, "best_of", "must be 1"},
    {API_COMPLETION, "{\"prompt\": \"x\", \"return_tokens_as_token_ids\": 1}", 400, "return_tokens_as_token_ids", "must be a boolean"},
    {API_TOKENIZE, "{}", 400, "prompt", "'prompt' (text) or 'messages' is required"},
    {API_DETOKENIZE, "{}", 400, "tokens", "'tokens' is required"},
    {API_DETOKENIZE, "{\"tokens\": [1, -2]}", 400, "tokens", "outside the vocabulary"},
    {API_DETOKENIZE, "{\"tokens\": \"1 2\"}", 400, "tokens", "must be an array"},
};

static void test_bad_requests(void)
{
    for (size_t i = 0; i < ST_ARRAY_LEN(bad_cases); i++) {
        const struct bad_case *c = &bad_cases[i];
        struct api_request r;
        struct api_error e;
        int rc = parse(&r, c->kind, c->body, &e);
        CHECK_MSG(rc < 0, "case %zu (%s) was accepted", i, c->body);
        if (rc >= 0) {
            api_request_free(&r);
            continue;
        }
        CHECK_MSG(e.status == c->status, "case %zu (%s): status %d, want %d (%s)", i, c->body, e.status, c->status, e.message);
        CHECK_MSG(!strcmp(e.param, c->param), "case %zu (%s): param \"%s\", want \"%s\"", i, c->body, e.param, c->param);
        CHECK_MSG(strstr(e.message, c->needle) != NULL, "case %zu (%s): message \"%s\" lacks \"%s\"", i, c->body,
                  e.message, c->needle);
        /* the error body has OpenAI's shape */
        json_t *j = api_error_json(&e);
        const json_t *o = json_object_get(j, "error");
        CHECK(json_is_string(json_object_get(o, "message")) && json_is_string(json_object_get(o, "type")));
        CHECK(json_object_get(o, "param") && json_object_get(o, "code"));
        json_decref(j);
        api_request_free(&r); /* harmless after an error */
    }
}

/* ---- good requests ---- */

static void test_chat_fields(void)
{
    struct api_request r;
    struct api_error e;
    const char *body =
        "{\"model\": \"kjv\", \"messages\": [{\"role\": \"developer\", \"content\": \"be brief\"},"
        " {\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"a\"}, {\"type\": \"text\", \"text\": \"b\"}]},"
        " {\"role\": \"assistant\", \"content\": null, \"tool_calls\": []}],"
        " \"temperature\": 0, \"top_p\": 0.5, \"top_k\": -1, \"max_completion_tokens\": 7, \"stop\": [\"x\", \"yz\"],"
        " \"stream\": true, \"stream_options\": {\"include_usage\": true}, \"logprobs\": true, \"top_logprobs\": 4,"
        " \"seed\": 42, \"logit_bias\": {\"17\": -100, \"3\": 2.5}, \"chat_template_kwargs\": {\"enable_thinking\": false},"
        " \"return_tokens_as_token_ids\": true, \"unknown_field\": {\"ignored\": true}, \"user\": \"u1\", \"n\": 1}";
    REQUIRE_MSG(parse(&r, API_CHAT, body, &e) == 0, "%s", e.message);
    CHECK_EQ_INT(json_array_size(r.messages), 3);
    CHECK_STR(json_string_value(json_object_get(json_array_get(r.messages, 0), "role")), "system");
    CHECK_STR(json_string_value(json_object_get(json_array_get(r.messages, 1), "content")), "a\nb");
    CHECK(json_is_null(json_object_get(json_array_get(r.messages, 2), "content")));
    CHECK_NEAR(r.sp.temperature, 0, 0);
    CHECK_NEAR(r.sp.top_p, 0.5, 1e-7);
    CHECK_EQ_INT(r.sp.top_k, 0);
    CHECK_EQ_INT(r.max_tokens, 7);
    CHECK_EQ_INT(r.n_stop, 2);
    CHECK_STR(r.stop[1], "yz");
    CHECK(r.stream && r.include_usage && r.logprobs && r.tokens_as_ids);
    CHECK_EQ_INT(r.top_logprobs, 4);
    CHECK_EQ_INT((int64_t)r.sp.seed, 42);
    CHECK_EQ_INT(r.sp.n_bias, 2);
    CHECK_EQ_INT(r.enable_thinking, 0);
    CHECK(r.template_kwargs != NULL);
    CHECK(!r.add_special);
    api_request_free(&r);

    /* defaults */
    REQUIRE(parse(&r, API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}", &e) == 0);
    CHECK_EQ_INT(r.max_tokens, 0);
    CHECK_NEAR(r.sp.temperature, 1, 0);
    CHECK(!r.stream && !r.logprobs && r.skip_special && r.add_generation_prompt);
    CHECK_EQ_INT(r.enable_thinking, -1);
    api_request_free(&r);

    /* tool_choice none drops the tools */
    REQUIRE(parse(&r, API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"tools\": [{\"type\": \"function\"}],"
                                " \"tool_choice\": \"none\"}", &e) == 0);
    CHECK(r.tools == NULL);
    api_request_free(&r);
    REQUIRE(parse(&r, API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"tools\": [{\"type\": \"function\"}]}", &e) == 0);
    CHECK(r.tools != NULL);
    api_request_free(&r);
}

static void test_completion_fields(void)
{
    struct api_request r;
    struct api_error e;
    REQUIRE(parse(&r, API_COMPLETION, "{\"prompt\": [[5, 6, 7]], \"logprobs\": 20, \"temperature\": 0.0, \"max_tokens\": 3.0}", &e) == 0);
    CHECK_EQ_INT(r.n_prompt_ids, 3);
    CHECK_EQ_INT(r.prompt_ids[2], 7);
    CHECK(r.logprobs);
    CHECK_EQ_INT(r.top_logprobs, 20);
    CHECK_EQ_INT(r.max_tokens, 3);
    api_request_free(&r);
    REQUIRE(parse(&r, API_COMPLETION, "{\"prompt\": [\"hello\"]}", &e) == 0);
    CHECK_STR(r.prompt, "hello");
    CHECK_EQ_INT(r.max_tokens, 16); /* OpenAI's legacy default */
    CHECK(r.add_special && !r.logprobs);
    api_request_free(&r);
    REQUIRE(parse(&r, API_COMPLETION, "{\"prompt\": \"x\", \"logprobs\": 0, \"add_special_tokens\": false, \"stream\": false,"
                                      " \"stream_options\": null, \"echo\": false}", &e) == 0);
    CHECK(r.logprobs && r.top_logprobs == 0 && !r.add_special);
    api_request_free(&r);
    REQUIRE(parse(&r, API_DETOKENIZE, "{\"tokens\": [1, 2, 999]}", &e) == 0);
    CHECK_EQ_INT(r.n_prompt_ids, 3);
    api_request_free(&r);
}

static void test_budget(void)
{
    struct api_request r;
    struct api_error e;
    int mt = -1;
    REQUIRE(parse(&r, API_COMPLETION, "{\"prompt\": [1], \"max_tokens\": 100}", &e) == 0);
    CHECK(api_request_budget(&r, 28, &LIM, &mt, &e) == 0 && mt == 100);
    CHECK(api_request_budget(&r, 29, &LIM, &mt, &e) < 0);
    CHECK_EQ_INT(e.status, 400);
    CHECK_MSG(strstr(e.message, "maximum context length is 128 tokens") && strstr(e.message, "you requested 129 tokens (29 in the prompt, 100 in the completion)"),
              "%s", e.message);
    CHECK_STR(e.code, "context_length_exceeded");
    api_request_free(&r);
    REQUIRE(parse(&r, API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}", &e) == 0);
    CHECK(api_request_budget(&r, 100, &LIM, &mt, &e) == 0 && mt == 28); /* unset: the rest of the context */
    CHECK(api_request_budget(&r, 128, &LIM, &mt, &e) < 0);
    CHECK_MSG(strstr(e.message, "your request has 128 input tokens"), "%s", e.message);
    api_request_free(&r);
}

/* ---- prompts against the fixture tokenizer and template ---- */

static void test_prompt_goldens(void)
{
    char err[ST_ERR_LEN];
    struct tokenizer *tok = NULL;
    struct chat_template *tmpl = NULL;
    if (tokenizer_load(&tok, fixture_path("models/kjv-qwen3-21m-8bit"), err) < 0) SKIP("no tokenizer: %s", err);
    const char *src = tokenizer_chat_template(tok);
    REQUIRE_MSG(src && chat_template_compile(&tmpl, src, err) == 0, "template: %s", err);
    json_error_t je;
    json_t *g = json_load_file(fixture_path("goldens/kjv-qwen3.goldens.json"), 0, &je);
    REQUIRE_MSG(g, "goldens: %s", je.text);
    const json_t *cases = json_object_get(json_object_get(g, "cases"), "q8");
    struct api_limits lim = {"kjv", 151936, 2048, 20};
    size_t i;
    const json_t *c;
    int n_chat = 0, n_text = 0;
    json_array_foreach(cases, i, c) {
        json_t *body = json_object();
        bool chat = !strcmp(json_string_value(json_object_get(c, "kind")), "chat");
        if (chat) {
            json_object_set(body, "messages", json_object_get(c, "messages"));
            json_t *kw = json_object();
            json_object_set(kw, "enable_thinking", json_object_get(c, "enable_thinking"));
            json_object_set_new(body, "chat_template_kwargs", kw);
        } else {
            json_object_set(body, "prompt", json_object_get(c, "prompt"));
        }
        char *s = json_dumps(body, 0);
        json_decref(body);
        struct api_request r;
        struct api_error e;
        struct api_prompt p;
        int rc = api_request_parse(&r, chat ? API_CHAT : API_COMPLETION, s, strlen(s), &lim, &e);
        free(s);
        CHECK_MSG(rc == 0, "case %zu: %s", i, e.message);
        if (rc < 0) continue;
        rc = api_prompt_build(&r, tok, tmpl, &p, &e);
        CHECK_MSG(rc == 0, "case %zu: %s", i, e.message);
        if (rc == 0) {
            const json_t *want = json_object_get(c, "prompt_ids");
            bool same = p.n_ids == (int)json_array_size(want);
            for (int k = 0; same && k < p.n_ids; k++) same = p.ids[k] == json_integer_value(json_array_get(want, (size_t)k));
            CHECK_MSG(same, "case %zu: prompt ids differ from the goldens (%d vs %zu ids)", i, p.n_ids, json_array_size(want));
            if (chat) {
                CHECK_STR(p.text, json_string_value(json_object_get(c, "prompt")));
                CHECK(p.think);
                CHECK(!p.in_reasoning); /* Qwen3's template never leaves a think block open */
                n_chat++;
            } else {
                CHECK(p.text == NULL && !p.think);
                n_text++;
            }
            api_prompt_free(&p);
        }
        api_request_free(&r);
    }
    CHECK(n_chat >= 3 && n_text >= 2);
    json_decref(g);

    /* a template that opens the think block in the prompt */
    struct chat_template *open = NULL;
    REQUIRE_MSG(chat_template_compile(&open, "{% for m in messages %}{{ m.content }}{% endfor %}<think>\n", err) == 0, "%s", err);
    struct api_request r;
    struct api_error e;
    struct api_prompt p;
    const char *b1 = "{\"messages\": [{\"role\": \"user\", \"content\": \"hi <think>x</think>\"}]}";
    REQUIRE(api_request_parse(&r, API_CHAT, b1, strlen(b1), &lim, &e) == 0);
    REQUIRE_MSG(api_prompt_build(&r, tok, open, &p, &e) == 0, "%s", e.message);
    CHECK(p.think && p.in_reasoning);
    api_prompt_free(&p);
    /* no template: a clear 400 */
    CHECK(api_prompt_build(&r, tok, NULL, &p, &e) < 0 && e.status == 400 && strstr(e.message, "no chat template"));
    api_request_free(&r);
    /* token-id prompts need no tokenizer; text prompts do */
    REQUIRE(api_request_parse(&r, API_COMPLETION, "{\"prompt\": [1, 2]}", strlen("{\"prompt\": [1, 2]}"), &lim, &e) == 0);
    CHECK(api_prompt_build(&r, NULL, NULL, &p, &e) == 0 && p.n_ids == 2);
    api_prompt_free(&p);
    api_request_free(&r);
    REQUIRE(api_request_parse(&r, API_COMPLETION, "{\"prompt\": \"hi\"}", strlen("{\"prompt\": \"hi\"}"), &lim, &e) == 0);
    CHECK(api_prompt_build(&r, NULL, NULL, &p, &e) < 0 && strstr(e.message, "no tokenizer"));
    api_request_free(&r);
    chat_template_free(open);
    chat_template_free(tmpl);
    tokenizer_free(tok);
}

/* ---- responses ---- */

static void test_responses(void)
{
    struct api_request r;
    struct api_error e;
    REQUIRE(parse(&r, API_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"logprobs\": true, \"top_logprobs\": 2,"
                                " \"return_tokens_as_token_ids\": true, \"stream\": true, \"stream_options\": {\"include_usage\": true}}", &e) == 0);
    struct api_token toks[2] = {{.id = 7, .logprob = -0.5f, .n_top = 3, .top_ids = {7, 9, 11}, .top_lp = {-0.5f, -1.5f, -2.5f}},
                                {.id = 9, .logprob = -1e30f, .n_top = 0}};
    struct api_result res = {.id = "chatcmpl-x", .created = 5, .model = "kjv", .content = "Hi", .content_len = 2,
                             .reasoning = "hmm", .reasoning_len = 3, .tokens = toks, .n_tokens = 2, .n_prompt = 4,
                             .n_completion = 2, .finish_reason = "stop", .stop_id = -1};
    json_t *j = api_response_json(&r, &res, NULL);
    const json_t *ch = json_array_get(json_object_get(j, "choices"), 0);
    CHECK_STR(json_string_value(json_object_get(j, "object")), "chat.completion");
    CHECK_STR(json_string_value(json_object_get(json_object_get(ch, "message"), "content")), "Hi");
    CHECK_STR(json_string_value(json_object_get(json_object_get(ch, "message"), "reasoning_content")), "hmm");
    CHECK_STR(json_string_value(json_object_get(ch, "finish_reason")), "stop");
    const json_t *lc = json_object_get(json_object_get(ch, "logprobs"), "content");
    CHECK_EQ_INT(json_array_size(lc), 2);
    CHECK_STR(json_string_value(json_object_get(json_array_get(lc, 0), "token")), "token_id:7");
    CHECK_EQ_INT(json_array_size(json_object_get(json_array_get(lc, 0), "top_logprobs")), 2); /* K, not n_top */
    CHECK_NEAR(json_number_value(json_object_get(json_array_get(lc, 1), "logprob")), API_LOGPROB_FLOOR, 0);
    CHECK_EQ_INT(json_array_size(json_object_get(json_array_get(lc, 0), "bytes")), strlen("token_id:7"));
    CHECK_EQ_INT(json_integer_value(json_object_get(json_object_get(j, "usage"), "total_tokens")), 6);
    json_decref(j);

    /* stream chunks: the first carries the role, the finish chunk the reason, usage chunk has no choices */
    struct api_result d = res;
    d.first = true;
    d.finish_reason = NULL;
    d.reasoning = NULL;
    d.content = NULL;
    d.content_len = 0;
    d.n_tokens = 0;
    j = api_chunk_json(&r, &d, NULL);
    ch = json_array_get(json_object_get(j, "choices"), 0);
    CHECK_STR(json_string_value(json_object_get(j, "object")), "chat.completion.chunk");
    CHECK_STR(json_string_value(json_object_get(json_object_get(ch, "delta"), "role")), "assistant");
    CHECK_STR(json_string_value(json_object_get(json_object_get(ch, "delta"), "content")), "");
    CHECK(json_is_null(json_object_get(ch, "finish_reason")));
    CHECK(json_is_null(json_object_get(j, "usage")) && json_object_get(j, "usage"));
    json_decref(j);
    j = api_usage_chunk_json(&r, &res);
    CHECK_EQ_INT(json_array_size(json_object_get(j, "choices")), 0);
    CHECK_EQ_INT(json_integer_value(json_object_get(json_object_get(j, "usage"), "completion_tokens")), 2);
    json_decref(j);
    api_request_free(&r);

    /* completions, legacy logprobs: dicts that always hold the sampled token, text offsets */
    REQUIRE(parse(&r, API_COMPLETION, "{\"prompt\": [1], \"logprobs\": 1, \"return_tokens_as_token_ids\": true}", &e) == 0);
    struct api_token t2[2] = {{.id = 5, .logprob = -0.1f, .n_top = 1, .top_ids = {5}, .top_lp = {-0.1f}},
                              {.id = 6, .logprob = -3.0f, .n_top = 1, .top_ids = {8}, .top_lp = {-0.2f}}};
    struct api_result rc = {.id = "cmpl-y", .model = "kjv", .content = "ab", .content_len = 2, .tokens = t2, .n_tokens = 2,
                            .finish_reason = "length", .stop_str = "zz", .stop_id = -1};
    j = api_response_json(&r, &rc, NULL);
    ch = json_array_get(json_object_get(j, "choices"), 0);
    CHECK_STR(json_string_value(json_object_get(ch, "text")), "ab");
    CHECK_STR(json_string_value(json_object_get(ch, "stop_reason")), "zz");
    const json_t *lp = json_object_get(ch, "logprobs");
    CHECK_STR(json_string_value(json_array_get(json_object_get(lp, "tokens"), 1)), "token_id:6");
    const json_t *top1 = json_array_get(json_object_get(lp, "top_logprobs"), 1);
    CHECK_EQ_INT(json_object_size(top1), 2);
    CHECK_NEAR(json_number_value(json_object_get(top1, "token_id:6")), -3.0, 1e-6);
    CHECK_NEAR(json_number_value(json_object_get(top1, "token_id:8")), -0.2, 1e-6);
    CHECK_EQ_INT(json_integer_value(json_array_get(json_object_get(lp, "text_offset"), 1)), strlen("token_id:5"));
    json_decref(j);
    api_request_free(&r);

    /* ids, models, tokenize */
    char id[64];
    api_make_id(id, sizeof(id), "chatcmpl-");
    CHECK_EQ_INT(strlen(id), 9 + 32);
    char id2[64];
    api_make_id(id2, sizeof(id2), "chatcmpl-");
    CHECK(strcmp(id, id2) != 0);
    j = api_models_json("kjv", 2048, 1);
    CHECK_STR(json_string_value(json_object_get(json_array_get(json_object_get(j, "data"), 0), "id")), "kjv");
    CHECK_EQ_INT(json_integer_value(json_object_get(json_array_get(json_object_get(j, "data"), 0), "max_model_len")), 2048);
    json_decref(j);
}

/* ---- textproc ---- */

static bool utf8_ok(const char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        size_t k = c < 0x80 ? 0 : (c & 0xE0) == 0xC0 ? 1 : (c & 0xF0) == 0xE0 ? 2 : (c & 0xF8) == 0xF0 ? 3 : 9;
        if (k == 9 || i + k >= n) return false;
        for (size_t j = 1; j <= k; j++)
            if (((unsigned char)s[i + j] & 0xC0) != 0x80) return false;
        i += k + 1;
    }
    return true;
}

static void push_all(struct textproc *tp, const char *const *pieces, int n)
{
    for (int i = 0; i < n; i++)
        if (textproc_push(tp, pieces[i], strlen(pieces[i])) == 1) break;
    textproc_finish(tp);
}

static void test_textproc_cases(void)
{
    struct textproc tp;
    const char *stops[] = {"STOP", "\n\n"};
    /* held back while it could still be a stop string, released when it cannot */
    REQUIRE(textproc_init(&tp, stops, 2, false, false) == 0);
    CHECK_EQ_INT(textproc_push(&tp, "Hello ST", 8), 0);
    CHECK_STR(tp.content.s, "Hello ");
    CHECK_EQ_INT(textproc_push(&tp, "AR", 2), 0);
    CHECK_STR(tp.content.s, "Hello STAR");
    CHECK_EQ_INT(textproc_push(&tp, " S", 2), 0);
    CHECK_STR(tp.content.s, "Hello STAR ");
    CHECK_EQ_INT(textproc_push(&tp, "TO", 2), 0);
    CHECK_STR(tp.content.s, "Hello STAR ");
    CHECK_EQ_INT(textproc_push(&tp, "P and more", 10), 1);
    CHECK_STR(tp.content.s, "Hello STAR ");
    CHECK(tp.stopped && tp.stop_index == 0);
    CHECK_EQ_INT(textproc_push(&tp, "x", 1), 1); /* ignored after the stop */
    CHECK_EQ_INT(textproc_finish(&tp), 0);
    CHECK_STR(tp.content.s, "Hello STAR ");
    textproc_free(&tp);
    /* earliest of several, within one piece */
    REQUIRE(textproc_init(&tp, stops, 2, false, false) == 0);
    CHECK_EQ_INT(textproc_push(&tp, "a\n\nb STOP", 9), 1);
    CHECK_STR(tp.content.s, "a");
    CHECK_EQ_INT(tp.stop_index, 1);
    textproc_free(&tp);
    /* a partial stop string at the end is released by finish */
    REQUIRE(textproc_init(&tp, stops, 2, false, false) == 0);
    CHECK_EQ_INT(textproc_push(&tp, "abc STO", 7), 0);
    CHECK_STR(tp.content.s, "abc ");
    textproc_finish(&tp);
    CHECK_STR(tp.content.s, "abc STO");
    CHECK(!tp.stopped);
    textproc_free(&tp);
    /* UTF-8: a stop string starting with a multi-byte character; nothing is ever cut inside a character */
    const char *ustops[] = {"\xc3\xa9t\xc3\xa9"};
    REQUIRE(textproc_init(&tp, ustops, 1, false, false) == 0);
    CHECK_EQ_INT(textproc_push(&tp, "caf\xc3\xa9", 5), 0);
    CHECK_STR(tp.content.s, "caf");
    CHECK_EQ_INT(textproc_push(&tp, " \xc3\xa9t", 4), 0);
    CHECK_STR(tp.content.s, "caf\xc3\xa9 ");
    CHECK_EQ_INT(textproc_push(&tp, "\xc3\xa9!", 3), 1);
    CHECK_STR(tp.content.s, "caf\xc3\xa9 ");
    textproc_free(&tp);

    /* think: opened by the model, split across pieces */
    REQUIRE(textproc_init(&tp, NULL, 0, true, false) == 0);
    const char *p1[] = {"<thi", "nk>\nhm", "m\n</th", "ink>\n\nAns", "wer"};
    push_all(&tp, p1, 5);
    CHECK_STR(tp.reasoning.s, "\nhmm\n");
    CHECK_STR(tp.content.s, "\n\nAnswer");
    CHECK(tp.reasoned);
    textproc_free(&tp);
    /* opened by the prompt */
    REQUIRE(textproc_init(&tp, NULL, 0, true, true) == 0);
    const char *p2[] = {"abc</think>", "def"};
    push_all(&tp, p2, 2);
    CHECK_STR(tp.reasoning.s, "abc");
    CHECK_STR(tp.content.s, "def");
    textproc_free(&tp);
    /* unterminated reasoning stays reasoning */
    REQUIRE(textproc_init(&tp, NULL, 0, true, true) == 0);
    const char *p3[] = {"still thinking </thi"};
    push_all(&tp, p3, 1);
    CHECK_STR(tp.reasoning.s, "still thinking </thi");
    CHECK_STR(tp.content.s, "");
    textproc_free(&tp);
    /* a <think> after content is just text; no tags at all: all content, not reasoned */
    REQUIRE(textproc_init(&tp, NULL, 0, true, false) == 0);
    const char *p4[] = {"  Hello <think>x</think>"};
    push_all(&tp, p4, 1);
    CHECK_STR(tp.content.s, "  Hello <think>x</think>");
    CHECK(!tp.reasoned);
    textproc_free(&tp);
    /* leading whitespace before <think> is dropped with the tag */
    REQUIRE(textproc_init(&tp, NULL, 0, true, false) == 0);
    const char *p5[] = {"\n", " <", "think>r</think>c"};
    push_all(&tp, p5, 3);
    CHECK_STR(tp.reasoning.s, "r");
    CHECK_STR(tp.content.s, "c");
    textproc_free(&tp);
    /* whitespace only: released as content at the end */
    REQUIRE(textproc_init(&tp, NULL, 0, true, false) == 0);
    const char *p6[] = {"\n", " "};
    push_all(&tp, p6, 2);
    CHECK_STR(tp.content.s, "\n ");
    textproc_free(&tp);
    /* think disabled: tags are text */
    REQUIRE(textproc_init(&tp, NULL, 0, false, false) == 0);
    const char *p7[] = {"<think>x</think>y"};
    push_all(&tp, p7, 1);
    CHECK_STR(tp.content.s, "<think>x</think>y");
    textproc_free(&tp);
    /* a stop string inside the reasoning ends everything there */
    const char *s8[] = {"END"};
    REQUIRE(textproc_init(&tp, s8, 1, true, false) == 0);
    const char *p8[] = {"<think>abcE", "ND</think>zzz"};
    push_all(&tp, p8, 2);
    CHECK_STR(tp.reasoning.s, "abc");
    CHECK_STR(tp.content.s, "");
    CHECK(tp.stopped);
    textproc_free(&tp);
}

/* Random text over an alphabet with multi-byte characters, random stop strings taken from it, random splits:
 * the output must equal the text up to the first stop string, every intermediate output must be a valid UTF-8
 * prefix of the final one. */
static void test_textproc_random(void)
{
    static const char *alpha[] = {"a", "b", " ", "\n", "\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x98\x80", "<", ">"};
    struct rng g;
    rng_seed(&g, 0x5eed);
    for (int iter = 0; iter < 400; iter++) {
        char text[512];
        size_t n = 0;
        size_t starts[256];
        int n_chars = 0;
        int len = 10 + (int)(rng_next(&g) % 80);
        for (int i = 0; i < len; i++) {
            const char *c = alpha[rng_next(&g) % ST_ARRAY_LEN(alpha)];
            starts[n_chars++] = n;
            memcpy(text + n, c, strlen(c));
            n += strlen(c);
        }
        text[n] = 0;
        /* 1-3 stop strings: substrings of the text on character boundaries, or absent ones */
        char stop_buf[3][64];
        const char *stops[3];
        int n_stops = 1 + (int)(rng_next(&g) % 3);
        for (int s = 0; s < n_stops; s++) {
            if (rng_next(&g) % 4 == 0) {
                snprintf(stop_buf[s], sizeof(stop_buf[s]), "zz%d", s);
            } else {
                int a = (int)(rng_next(&g) % (uint64_t)n_chars), b = a + 1 + (int)(rng_next(&g) % 4);
                if (b > n_chars) b = n_chars;
                size_t from = starts[a], to = b < n_chars ? starts[b] : n;
                memcpy(stop_buf[s], text + from, to - from);
                stop_buf[s][to - from] = 0;
            }
            stops[s] = stop_buf[s];
        }
        /* reference: the earliest occurrence of any stop string */
        size_t cut = n;
        for (int s = 0; s < n_stops; s++) {
            const char *hit = strstr(text, stops[s]);
            if (hit && (size_t)(hit - text) < cut) cut = (size_t)(hit - text);
        }
        struct textproc tp;
        REQUIRE(textproc_init(&tp, stops, n_stops, false, false) == 0);
        /* feed on character boundaries, in random runs of characters */
        int i = 0, stopped = 0;
        while (i < n_chars && !stopped) {
            int k = 1 + (int)(rng_next(&g) % 5);
            if (i + k > n_chars) k = n_chars - i;
            size_t from = starts[i], to = i + k < n_chars ? starts[i + k] : n;
            stopped = textproc_push(&tp, text + from, to - from);
            CHECK(stopped >= 0);
            CHECK_MSG(utf8_ok(tp.content.s, tp.content.len), "iter %d: content not valid UTF-8", iter);
            CHECK_MSG(tp.content.len <= cut && memcmp(tp.content.s, text, tp.content.len) == 0,
                      "iter %d: emitted text that is not a prefix of the answer", iter);
            i += k;
        }
        textproc_finish(&tp);
        CHECK_MSG(tp.content.len == cut && memcmp(tp.content.s, text, cut) == 0,
                  "iter %d: got %zu bytes, want %zu (text \"%s\", stop \"%s\")", iter, tp.content.len, cut, text, stops[0]);
        CHECK_EQ_INT(tp.stopped, cut < n);
        textproc_free(&tp);
    }
}

/* ---- metrics ---- */

static void test_metrics_render(void)
{
    struct metrics *m;
    char err[ST_ERR_LEN];
    REQUIRE(metrics_init(&m, err) == 0);
    metrics_request(m, METRICS_ROUTE_CHAT, 200);
    metrics_request(m, METRICS_ROUTE_CHAT, 200);
    metrics_request(m, METRICS_ROUTE_COMPLETIONS, 400);
    metrics_error(m, "invalid_request_error");
    metrics_observe(m, METRICS_TTFT, 0.003);
    metrics_observe(m, METRICS_TTFT, 0.2);
    metrics_observe(m, METRICS_TTFT, 1000);
    metrics_observe(m, METRICS_ITL, 0.01);
    struct sched_stats st = {0};
    st.requests_total = 3;
    st.requests_finished[FINISH_STOP] = 2;
    st.prompt_tokens = 40;
    st.generated_tokens = 90;
    st.queue_depth = 1;
    st.active = 2;
    st.busy_s = 1.5;
    struct text_buf b = {0};
    REQUIRE(metrics_render(m, &st, 16, &b) == 0);
    const char *want[] = {
        "# TYPE strata_http_requests_total counter\n",
        "strata_http_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 2\n",
        "strata_http_requests_total{route=\"/v1/completions\",status=\"400\"} 1\n",
        "strata_errors_total{type=\"invalid_request_error\"} 1\n",
        "# TYPE strata_time_to_first_token_seconds histogram\n",
        "strata_time_to_first_token_seconds_bucket{le=\"0.001\"} 0\n",
        "strata_time_to_first_token_seconds_bucket{le=\"0.005\"} 1\n",
        "strata_time_to_first_token_seconds_bucket{le=\"0.25\"} 2\n",
        "strata_time_to_first_token_seconds_bucket{le=\"80\"} 2\n",
        "strata_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3\n",
        "strata_time_to_first_token_seconds_count 3\n",
        "strata_inter_token_latency_seconds_count 1\n",
        "strata_request_finished_total{finish_reason=\"stop\"} 2\n",
        "strata_prompt_tokens_total 40\n",
        "strata_generation_tokens_total 90\n",
        "strata_queue_depth 1\n",
        "strata_active_sequences 2\n",
        "strata_kv_slots 16\n",
        "strata_engine_busy_seconds_total 1.5\n",
    };
    for (size_t i = 0; i < ST_ARRAY_LEN(want); i++) CHECK_MSG(strstr(b.s, want[i]) != NULL, "missing: %s", want[i]);
    /* every sample line belongs to a family announced by HELP and TYPE before it */
    char *save = NULL, *copy = st_strdup(b.s);
    int n_samples = 0;
    for (char *line = strtok_r(copy, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (line[0] == '#') continue;
        char name[128];
        size_t k = strcspn(line, "{ ");
        REQUIRE(k < sizeof(name));
        memcpy(name, line, k);
        name[k] = 0;
        char *suffix = strstr(name, "_bucket");
        if (!suffix) suffix = strstr(name, "_sum");
        if (!suffix && strstr(name, "_count")) suffix = strstr(name, "_count");
        if (suffix && strstr(b.s, "histogram")) *suffix = 0;
        char help[160], type[160];
        snprintf(help, sizeof(help), "# HELP %s ", name);
        snprintf(type, sizeof(type), "# TYPE %s ", name);
        CHECK_MSG(strstr(b.s, help) && strstr(b.s, type), "no HELP/TYPE for %s", name);
        n_samples++;
    }
    free(copy);
    CHECK(n_samples > 40);
    text_buf_free(&b);
    metrics_free(m);
}

int main(void)
{
    RUN(test_bad_requests);
    RUN(test_chat_fields);
    RUN(test_completion_fields);
    RUN(test_budget);
    RUN(test_prompt_goldens);
    RUN(test_responses);
    RUN(test_textproc_cases);
    RUN(test_textproc_random);
    RUN(test_metrics_render);
    return check_done();
}
