/* tokenizer: Hugging Face tokenizer.json (BPE) encode/decode, exactly like the `tokenizers` library.
 *
 * Supports byte-level BPE (GPT-2 / Qwen2/3 / Llama 3: ByteLevel pre-tokenizer with the file's Split regex, run
 * with PCRE2 + JIT) and SentencePiece-style BPE (Metaspace / Replace+Prepend normalizers, byte fallback <0xNN>,
 * Llama 2, stories260K). Added/special tokens are matched before BPE. NFC normalization when the file asks.
 * Post-processor templates (TemplateProcessing, e.g. Llama 3 BOS) apply when add_special is true.
 * The tokenizer is immutable after load and safe to use from many threads at once.
 */
#ifndef STRATA_TOKENIZER_H
#define STRATA_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct tokenizer;

/* Loads dir/tokenizer.json and, if present, dir/tokenizer_config.json (bos/eos/pad token names, add_bos_token,
 * chat_template). */
int tokenizer_load(struct tokenizer **out, const char *dir, char *err);
void tokenizer_free(struct tokenizer *t);

/* Encodes len bytes of text. With add_special the post-processor's special tokens are added (e.g. BOS).
 * *ids is malloc'd (caller frees), *n_ids its length. Invalid UTF-8 is handled like the reference does. */
int tokenizer_encode(const struct tokenizer *t, const char *text, size_t len, bool add_special, int32_t **ids,
                     int *n_ids, char *err);
/* Decodes ids into a malloc'd NUL-terminated string (caller frees). skip_special drops special tokens.
 * Unknown ids give ST_EINVAL. */
int tokenizer_decode(const struct tokenizer *t, const int32_t *ids, int n_ids, bool skip_special, char **out,
                     size_t *out_len, char *err);

int tokenizer_vocab_size(const struct tokenizer *t);      /* highest id + 1, added tokens included */
const char *tokenizer_piece(const struct tokenizer *t, int32_t id); /* raw vocab string or NULL */
int32_t tokenizer_find(const struct tokenizer *t, const char *piece); /* id of an exact piece, or -1 */
bool tokenizer_is_special(const struct tokenizer *t, int32_t id);

/* From tokenizer_config.json (NULL / -1 when absent). */
const char *tokenizer_chat_template(const struct tokenizer *t);
const char *tokenizer_bos_token(const struct tokenizer *t);
const char *tokenizer_eos_token(const struct tokenizer *t);
int32_t tokenizer_bos_id(const struct tokenizer *t);
int32_t tokenizer_eos_id(const struct tokenizer *t);

/* Streaming decode: feed ids one at a time, get text that never ends inside a UTF-8 character (bytes of an
 * incomplete character are held back until completed; an invalid sequence is emitted as U+FFFD like the
 * reference decode would). */
struct detok_stream {
    const struct tokenizer *t;
    bool skip_special;
    unsigned char pending[64];
    int n_pending;
    bool at_start; /* for SentencePiece-style decoders that strip the leading space of the first token */
};
void detok_stream_init(struct detok_stream *s, const struct tokenizer *t, bool skip_special);
/* Appends the text completed by id to out (cap bytes, NUL-terminated); returns bytes written or a negative
 * ST_E* code (ST_ERANGE when cap is too small, ST_EINVAL for an unknown id). */
int detok_stream_push(struct detok_stream *s, int32_t id, char *out, size_t cap);
/* Emits whatever is still held back (as U+FFFD for an incomplete character). */
int detok_stream_flush(struct detok_stream *s, char *out, size_t cap);

#endif
