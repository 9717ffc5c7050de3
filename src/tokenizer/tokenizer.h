/* tokenizer: Hugging Face tokenizer.json (BPE) encode/decode, exactly like the `tokenizers` library.
 *
 * Supports byte-level BPE (GPT-2 / Qwen2/3 / Llama 3: ByteLevel pre-tokenizer with the file's Split regex, run
 * with PCRE2 + JIT) and SentencePiece-style BPE (Metaspace / Replace+Prepend normalizers, byte fallback <0xNN>,
 * Llama 2, stories260K). Added/special tokens are matched before BPE. NFC normalization when the file asks.
 * Post-processor templates (TemplateProcessing, e.g. Llama 3 BOS) apply when add_special is true.
 * The tokenizer is immutable after load and safe to use from many threads at once.
 *
 * What tokenizer.json may contain (anything else is refused at load with ST_EUNSUPPORTED naming the type):
 * - model: BPE (vocab, merges as "a b" strings or [a, b] pairs, unk_token, fuse_unk, byte_fallback,
 *   ignore_merges, continuing_subword_prefix, end_of_word_suffix; dropout is ignored: encoding is deterministic).
 * - normalizer: NFC, NFD, NFKC, NFKD, Lowercase, Strip, StripAccents, Replace, Prepend, ByteLevel, Sequence.
 * - pre_tokenizer: Split (Regex or String pattern, every behavior, invert), ByteLevel, Metaspace, Whitespace,
 *   WhitespaceSplit, Digits, Punctuation, Sequence.
 * - post_processor: TemplateProcessing, RobertaProcessing, BertProcessing, ByteLevel, Sequence.
 * - decoder: ByteLevel (first in the chain), Replace (String pattern), ByteFallback, Fuse, Strip, Metaspace,
 *   Sequence (at most DETOK_MAX_STAGES after ByteLevel).
 * truncation and padding are ignored (an inference server never truncates a prompt silently).
 * added_tokens honour lstrip/rstrip/single_word/normalized/special as the reference does; split_special_tokens
 * from tokenizer_config.json makes special tokens plain text. When tokenizer_config.json sets add_bos_token /
 * add_eos_token and the post-processor adds no special tokens itself, add_special adds BOS / EOS (what
 * transformers' Llama tokenizers do); tokens that only its added_tokens_decoder lists are added too (transformers
 * does that as well). Decoding is the tokenizers library's: transformers' clean_up_tokenization_spaces is not
 * applied.
 *
 * Input text must be valid UTF-8: the reference takes a Rust String, so invalid UTF-8 is refused with ST_EINVAL
 * and a message giving the byte offset (nothing is replaced silently). Texts over 1 GiB give ST_ERANGE.
 * Regexes are Oniguruma patterns run by PCRE2; the Unicode tables are PCRE2's and utf8proc's (their Unicode
 * versions may trail the reference's for characters assigned in the last few years).
 */
#ifndef STRATA_TOKENIZER_H
#define STRATA_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct tokenizer;

/* Loads dir/tokenizer.json and, if present, dir/tokenizer_config.json (bos/eos/pad token names, add_bos_token,
 * chat_template). Errors name the file and the problem (line and column for malformed JSON). */
int tokenizer_load(struct tokenizer **out, const char *dir, char *err);
/* The same from memory: json is tokenizer.json's text, config_json tokenizer_config.json's (may be NULL).
 * name is used in error messages. */
int tokenizer_load_json(struct tokenizer **out, const char *name, const char *json, size_t json_len,
                        const char *config_json, size_t config_len, char *err);
void tokenizer_free(struct tokenizer *t);

/* Encodes len bytes of text. With add_special the post-processor's special tokens are added (e.g. BOS).
 * *ids is malloc'd (caller frees; never NULL on success), *n_ids its length. Invalid UTF-8 gives ST_EINVAL. */
int tokenizer_encode(const struct tokenizer *t, const char *text, size_t len, bool add_special, int32_t **ids,
                     int *n_ids, char *err);
/* Decodes ids into a malloc'd NUL-terminated string (caller frees). skip_special drops special tokens.
 * Unknown ids give ST_EINVAL. The text is valid UTF-8 (invalid byte sequences become U+FFFD, as in the
 * reference). */
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
 * reference decode would). The concatenation of everything push and flush return equals tokenizer_decode of
 * the same ids. Text that a later token could still change is held back too: a byte-fallback run (<0xNN>
 * tokens) until the run ends, a partial match of a Replace decoder's pattern, characters a Strip decoder may
 * remove at the end. A byte-fallback run longer than DETOK_RUN_MAX bytes is emitted in pieces, cut at character
 * boundaries (the reference would turn the whole run into U+FFFDs if it later went invalid).
 * The state is plain data: no allocation, nothing to free; copying it forks the stream. Fields are private. */
#define DETOK_MAX_STAGES 8
#define DETOK_RUN_MAX 256
struct detok_utf8 {
    unsigned char b[4];
    uint8_t n, need, lo, hi;
};
struct detok_stage {
    uint32_t a, b;
    uint8_t flags, n_buf;
    unsigned char buf[6];
};
struct detok_stream {
    const struct tokenizer *t;
    bool skip_special;
    bool at_start;     /* no token has reached the decoders yet */
    bool sink_started; /* something has been emitted (decoder-less tokenizers join tokens with ' ') */
    int n_pending;     /* bytes of the current byte-fallback run */
    unsigned char pending[DETOK_RUN_MAX];
    struct detok_utf8 bl, run; /* ByteLevel: incomplete character; ByteFallback: validation of the run */
    struct detok_stage st[DETOK_MAX_STAGES];
};
void detok_stream_init(struct detok_stream *s, const struct tokenizer *t, bool skip_special);
/* Writes the text completed by id to out (cap bytes, NUL-terminated; it may be empty); returns the bytes written
 * or a negative ST_E* code (ST_ERANGE when cap is too small, ST_EINVAL for an unknown id). On error the stream is
 * unchanged, so the call can be repeated with a larger buffer. A stream is used by one thread at a time; any
 * number of streams can share a tokenizer. */
int detok_stream_push(struct detok_stream *s, int32_t id, char *out, size_t cap);
/* Emits whatever is still held back (as U+FFFD for an incomplete character). The stream is then back at its
 * start. */
int detok_stream_flush(struct detok_stream *s, char *out, size_t cap);
/* A buffer of this many bytes is always large enough for one detok_stream_push or detok_stream_flush. */
size_t tokenizer_stream_chunk_max(const struct tokenizer *t);

#endif
