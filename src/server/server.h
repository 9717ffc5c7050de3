/* server: the OpenAI-compatible HTTP API over the continuous-batching scheduler (src/server/sched.h).
 *
 * Routes: POST /v1/chat/completions and POST /v1/completions (JSON, or server-sent events with "stream": true),
 * GET /v1/models[/ID], GET /health, GET /metrics (Prometheus text format 0.0.4), POST /tokenize, POST /detokenize
 * (vLLM's shapes). Errors use OpenAI's body {"error": {"message", "type", "param", "code"}} with the HTTP status.
 *
 * Layers, each usable without the next (only the last one touches the network):
 * - api (api.c): a request body -> a validated struct api_request (api_request_parse: JSON, types, ranges, the
 *   model name), -> prompt token ids (api_prompt_build: chat template, tokenizer), -> the completion budget
 *   (api_request_budget: the context check), and results -> response JSON. Pure functions over caller-owned data; errors come back as struct api_error (status + message).
 * - textproc (text.c): streamed text -> content / reasoning_content, with stop strings (text that could be the
 *   start of a stop string is held back; the stop string itself is never emitted) and <think>...</think> split
 *   off as reasoning. Input pieces end on UTF-8 character boundaries and so do all outputs.
 * - metrics (metrics.c): counters and histograms, rendered as Prometheus text.
 * - server (http.c): a libmicrohttpd daemon, one thread per connection. A generation request becomes a job: the
 *   scheduler's on_token (scheduler thread) decodes, matches stop strings and appends to the job under its lock;
 *   the connection thread waits on the job's condition variable and writes JSON or SSE events. A client that goes
 *   away cancels its job at once (its KV slot is freed at the next step).
 *
 * Contract:
 * - server_init starts listening before returning; server_free answers new requests with 503, cancels in-flight
 *   ones (their clients get an error event or a 503, within a few seconds), stops the daemon, waits until the
 *   scheduler has finished every job it holds, then returns. Call server_free before sched_free. The scheduler,
 *   tokenizer and template are borrowed and must outlive the server.
 * - Every length and value from the network is checked: body size (413), header size (431, by libmicrohttpd),
 *   JSON, types, ranges, token ids, prompt length against the context.
 * - Library code: never prints to stdout, never exits; one log line per request to stderr.
 */
#ifndef STRATA_SERVER_H
#define STRATA_SERVER_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/core.h"
#include "engine/runner.h"
#include "sample/sample.h"
#include "server/sched.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

/* ---- text_buf: a growable byte string (always NUL-terminated once anything was appended) ---- */
struct text_buf {
    char *s;
    size_t len, cap;
};
int text_buf_append(struct text_buf *b, const char *s, size_t n); /* ST_ENOMEM on failure (b unchanged) */
int text_buf_printf(struct text_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void text_buf_free(struct text_buf *b);

/* ---- api: requests and responses ---- */
enum api_kind { API_CHAT, API_COMPLETION, API_TOKENIZE, API_DETOKENIZE, API_KIND_COUNT };

#define API_MAX_STOP 16          /* stop strings per request */
#define API_MAX_STOP_BYTES 256   /* bytes per stop string */
#define API_MAX_STOP_IDS 64      /* stop_token_ids per request */
#define API_LOGPROB_FLOOR -9999.0 /* logprobs are clamped here (JSON has no -inf) */

struct api_error {
    int status;          /* HTTP status */
    const char *type;    /* OpenAI error type, e.g. "invalid_request_error" (static string) */
    const char *code;    /* OpenAI error code or NULL (static string) */
    char param[64];      /* the offending field, "" when none */
    char message[ST_ERR_LEN];
};
/* Fills e (if not NULL) and returns ST_EINVAL. param may be NULL. */
int api_error_set(struct api_error *e, int status, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* {"error": {"message", "type", "param", "code"}} (new reference). */
json_t *api_error_json(const struct api_error *e);

struct api_limits {
    const char *model_name; /* the served model; a request naming another one gets 404 (NULL: any name) */
    int vocab;              /* token ids must be below this */
    int n_ctx;              /* tokens per sequence (prompt + completion) */
    int max_top;            /* most top logprobs per token (RUNNER_MAX_TOP) */
};

/* A validated request. Strings point into root (owned), so they live as long as the request. */
struct api_request {
    enum api_kind kind;
    json_t *root;               /* the parsed body */
    const char *model;          /* as given, or NULL */
    /* chat, and tokenize with messages */
    json_t *messages;           /* normalized copy: developer -> system, content parts joined into a string */
    const json_t *tools;        /* borrowed from root; NULL when absent or tool_choice is "none" */
    const json_t *template_kwargs; /* chat_template_kwargs (borrowed) or NULL */
    int enable_thinking;        /* from chat_template_kwargs: -1 unset, 0, 1 */
    bool add_generation_prompt; /* default true */
    /* completions, and tokenize with prompt */
    const char *prompt;         /* text prompt or NULL */
    size_t prompt_len;
    int32_t *prompt_ids;        /* prompt given as token ids (owned; detokenize: the tokens) or NULL */
    int n_prompt_ids;
    bool add_special;           /* add the tokenizer's special tokens to a text prompt */
    /* generation */
    struct sample_params sp;
    int max_tokens;             /* 0: up to the end of the context */
    bool stream, include_usage;
    bool logprobs;              /* return logprobs of the sampled tokens */
    int top_logprobs;           /* and the top K alternatives */
    bool tokens_as_ids;         /* vLLM's return_tokens_as_token_ids */
    bool ignore_eos, skip_special;
    const char *stop[API_MAX_STOP];
    int n_stop;
    int32_t stop_ids[API_MAX_STOP_IDS];
    int n_stop_ids;
};

/* Parses and validates a request body for one route (400 with the field named, 404 for another model). Unknown
 * top-level fields are ignored, except those that would change the result and are not supported (n != 1,
 * echo, suffix, response_format other than text, best_of, tool_choice required/named), which give 400.
 * On error r is left freed (api_request_free is harmless). */
int api_request_parse(struct api_request *r, enum api_kind kind, const char *body, size_t len,
                      const struct api_limits *lim, struct api_error *e);
void api_request_free(struct api_request *r);

struct api_prompt {
    int32_t *ids;      /* owned */
    int n_ids;
    char *text;        /* the rendered chat prompt (owned) or NULL */
    bool think;        /* split <think>...</think> into reasoning_content (chat, tokenizer knows the tags) */
    bool in_reasoning; /* the prompt opened a think block that the completion continues */
};
/* Builds the prompt ids: chat messages through the template (tok and tmpl needed) then tokenizer_encode without
 * special tokens; a text prompt with them when add_special; ids as given. tok may be NULL for id prompts. */
int api_prompt_build(const struct api_request *r, const struct tokenizer *tok, const struct chat_template *tmpl,
                     struct api_prompt *p, struct api_error *e);
void api_prompt_free(struct api_prompt *p);
/* The completion budget: max_tokens, or what is left of the context when unset. 400 with vLLM's message when
 * the prompt and completion do not fit n_ctx. */
int api_request_budget(const struct api_request *r, int n_prompt, const struct api_limits *lim, int *max_tokens,
                       struct api_error *e);

/* One generated token and its logprobs (n_top alternatives, most likely first). */
struct api_token {
    int32_t id;
    float logprob;
    int32_t n_top;
    int32_t top_ids[RUNNER_MAX_TOP];
    float top_lp[RUNNER_MAX_TOP];
};

/* A result or a streamed delta. */
struct api_result {
    const char *id;        /* "chatcmpl-..." / "cmpl-..." */
    int64_t created;
    const char *model;
    const char *content;   /* text (completions) or message content; may be NULL when empty */
    size_t content_len;
    const char *reasoning; /* reasoning_content or NULL */
    size_t reasoning_len;
    const struct api_token *tokens; /* the tokens this result or delta covers (logprobs) */
    int n_tokens;
    size_t text_offset;    /* completions: characters of text before tokens[0] */
    int n_prompt, n_completion;
    const char *finish_reason;  /* "stop", "length", or NULL while streaming */
    const char *stop_str;       /* the stop string that ended it, or NULL */
    int32_t stop_id;            /* the stop token id that ended it, or -1 */
    bool first;                 /* streaming: the first chunk (chat: carries the role) */
};

/* A token as a string for logprobs ("token_id:N" when tokens_as_ids; decoded text otherwise). Writes a
 * NUL-terminated string into out (cap bytes, truncated at a character boundary). */
void api_token_str(const struct tokenizer *tok, int32_t id, bool as_ids, char *out, size_t cap);
/* Whole responses (new references). */
json_t *api_response_json(const struct api_request *r, const struct api_result *res, const struct tokenizer *tok);
/* One SSE chunk (chat.completion.chunk or text_completion); with include_usage it carries "usage": null. */
json_t *api_chunk_json(const struct api_request *r, const struct api_result *res, const struct tokenizer *tok);
/* The final usage chunk of a stream with stream_options.include_usage (empty choices). */
json_t *api_usage_chunk_json(const struct api_request *r, const struct api_result *res);
json_t *api_models_json(const char *model_name, int n_ctx, int64_t created);
json_t *api_model_json(const char *model_name, int n_ctx, int64_t created);
json_t *api_tokenize_json(const int32_t *ids, int n, int n_ctx);
/* Writes "PREFIX<32 hex chars>" into out (cap >= strlen(prefix) + 33). */
void api_make_id(char *out, size_t cap, const char *prefix);

/* ---- textproc: stop strings and reasoning split over streamed text ---- */
enum textproc_mode { TEXTPROC_CONTENT, TEXTPROC_REASONING, TEXTPROC_MODE_COUNT };

struct textproc {
    char **stops;       /* owned copies */
    int n_stops;
    bool think;         /* recognize <think> (at the start) and </think> */
    enum textproc_mode mode;
    bool may_open;      /* no content yet: a <think> may still open reasoning */
    struct text_buf pend;   /* held back: could start a stop string */
    struct text_buf tag;    /* held back: could start a think tag */
    struct text_buf content, reasoning; /* the outputs so far */
    bool reasoned;      /* a think block was opened (by the prompt or a <think>) */
    bool stopped;       /* a stop string matched; further input is ignored */
    int stop_index;     /* which one (-1: none) */
};
/* in_reasoning: the prompt opened a think block (output starts as reasoning). */
int textproc_init(struct textproc *tp, const char *const *stops, int n_stops, bool think, bool in_reasoning);
/* Appends generated text. Returns 1 when a stop string matched (generation should stop), 0 when not, or
 * ST_ENOMEM. */
int textproc_push(struct textproc *tp, const char *text, size_t len);
/* End of generation: releases the held-back text (it did not become a stop string). */
int textproc_finish(struct textproc *tp);
void textproc_free(struct textproc *tp);

/* ---- metrics ---- */
enum metrics_route {
    METRICS_ROUTE_CHAT, METRICS_ROUTE_COMPLETIONS, METRICS_ROUTE_MODELS, METRICS_ROUTE_HEALTH, METRICS_ROUTE_METRICS,
    METRICS_ROUTE_TOKENIZE, METRICS_ROUTE_DETOKENIZE, METRICS_ROUTE_OTHER, METRICS_ROUTE_COUNT
};
enum metrics_hist {
    METRICS_TTFT,         /* seconds from arrival to the first token */
    METRICS_ITL,          /* seconds between tokens of one request */
    METRICS_E2E,          /* seconds from arrival to the last token */
    METRICS_HIST_COUNT
};

struct metrics;
int metrics_init(struct metrics **out, char *err);
void metrics_free(struct metrics *m);
/* One HTTP request answered with status. */
void metrics_request(struct metrics *m, enum metrics_route route, int status);
/* An error by OpenAI error type ("invalid_request_error", "server_error", ...) or "generation_error". */
void metrics_error(struct metrics *m, const char *type);
void metrics_observe(struct metrics *m, enum metrics_hist h, double seconds);
void metrics_connections(struct metrics *m, int delta); /* open HTTP connections */
/* Renders everything (plus the scheduler's gauges and counters from st, n_slots KV slots) as Prometheus text
 * format 0.0.4 into out (appended). */
int metrics_render(struct metrics *m, const struct sched_stats *st, int n_slots, struct text_buf *out);

/* ---- server ---- */
struct server_opts {
    const char *host;         /* bind address (default 127.0.0.1) */
    int port;                 /* 0: any free port (see server_port) */
    const char *api_key;      /* NULL or "": no authentication */
    const char *model_name;   /* reported and checked against requests */
    int vocab;                /* the model's vocabulary: token ids must be below it */
    size_t max_body_bytes;    /* default 4 MiB */
    int max_connections;      /* default 256 */
    int timeout_s;            /* idle connection timeout (slow clients), default 60 */
    size_t max_header_bytes;  /* per-connection buffer for the request line and headers, default 64 KiB */
    /* Optional: the node/cluster view. status_json returns a new reference for GET /v1/cluster (NULL: 404);
     * status_metrics appends Prometheus text (with HELP/TYPE) to GET /metrics. Called from connection
     * threads; must be thread-safe. */
    json_t *(*status_json)(void *ctx);
    void (*status_metrics)(void *ctx, struct text_buf *out);
    void *status_ctx;
};

struct server;

/* Starts listening. sched, tok (may be NULL: token-id prompts only) and tmpl (may be NULL: no chat) are borrowed.
 * eos_ids: the model's end-of-sequence ids (never shown as text). */
int server_init(struct server **out, struct sched *s, const struct tokenizer *tok, const struct chat_template *tmpl,
                const int32_t *eos_ids, int n_eos, const struct server_opts *o, char *err);
/* The port actually bound. */
int server_port(const struct server *srv);
/* Stops (see the contract above). */
void server_free(struct server *srv);

/* ---- webui: the page for people at GET / (webui.c) ---- */
struct webui_page {
    const char *body; /* the HTML document: static storage, never freed */
    size_t len;
    const char *csp;  /* the Content-Security-Policy header to send with it (inline script and style by hash) */
};
/* The page for a server that needs an API key (need_key: the page asks for it before calling the API) or not.
 * Built on first use; thread-safe. */
void webui_page(bool need_key, struct webui_page *out);
/* ---- end webui ---- */

#endif
