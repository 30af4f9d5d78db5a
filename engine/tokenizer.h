/* engine/tokenizer.h — tokenizers built from GGUF metadata.
 *
 * Two kinds, chosen by tokenizer.ggml.model:
 *   "gpt2"  byte-level BPE (vocab + merges), with the pre-tokenizer regex split of
 *           tokenizer.ggml.pre: smollm, llama-bpe (llama3), qwen2, gpt-2 (default).
 *   "llama" SentencePiece-style BPE (vocab + scores), byte fallback <0xNN>, and the
 *           leading-space rule (tokenizer.ggml.add_space_prefix, default true).
 * The tokenizer copies what it needs from the mn_gguf: the gguf may be closed afterwards.
 * Token ids are int32 in [0, n_vocab).
 */
#ifndef MN_TOKENIZER_H
#define MN_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/err.h"
#include "engine/gguf.h"

typedef struct mn_tokenizer mn_tokenizer;

enum {
    MN_TOK_ADD_BOS = 1 << 0,        /* prepend BOS if the model wants one (tokenizer.ggml.add_bos_token) */
    MN_TOK_PARSE_SPECIAL = 1 << 1,  /* recognise special/control token texts ("<|im_start|>") in the input */
};

/** Build from the tokenizer.* keys of g. MN_EFORMAT / MN_EUNSUPPORTED name the key at fault. */
mn_err mn_tokenizer_from_gguf(const mn_gguf *g, mn_tokenizer **out, mn_errbuf *eb);
void mn_tokenizer_free(mn_tokenizer *t);

int32_t mn_tokenizer_n_vocab(const mn_tokenizer *t);
int32_t mn_tokenizer_bos(const mn_tokenizer *t);   /* -1 if none */
int32_t mn_tokenizer_eos(const mn_tokenizer *t);   /* -1 if none */
int32_t mn_tokenizer_eot(const mn_tokenizer *t);   /* end of turn (<|im_end|>, <|eot_id|>); -1 if none */
/** True for tokens that end generation (EOS, EOT, and other end-of-generation tokens). */
bool mn_tokenizer_is_eog(const mn_tokenizer *t, int32_t id);
/** True for control/special tokens (type CONTROL or USER_DEFINED in the GGUF). */
bool mn_tokenizer_is_special(const mn_tokenizer *t, int32_t id);
/** Id of the token whose GGUF text is exactly s (e.g. "<|im_start|>", "Ġworld"), or -1. */
int32_t mn_tokenizer_find(const mn_tokenizer *t, const char *s, size_t len);
/** Name of the algorithm: "gpt2" or "llama"; and the pre-tokenizer kind ("smollm", ...). */
const char *mn_tokenizer_kind(const mn_tokenizer *t);
const char *mn_tokenizer_pre(const mn_tokenizer *t);

/** Encode len bytes of text (any bytes; invalid UTF-8 is encoded byte-wise, never an error;
 *  a byte a gpt2 vocab has no token for is dropped, as HF does: SmolLM2 lacks 21 of them,
 *  e.g. 0xC0, 0xFF).
 *  *tokens is allocated with mn_malloc and owned by the caller (mn_free). */
mn_err mn_tokenize(const mn_tokenizer *t, const char *text, size_t len, int flags,
                   int32_t **tokens, int64_t *n_tokens, mn_errbuf *eb);

/** The bytes token id stands for (byte-level decoding applied, "▁" turned into a space
 *  for llama), not NUL-terminated; special tokens give their text. NULL if id is out of range. */
const char *mn_token_bytes(const mn_tokenizer *t, int32_t id, size_t *len);

/** Decode n tokens into one buffer of raw bytes: the concatenated mn_token_bytes, with
 *  special tokens left out unless render_special, and for llama the leading space of the
 *  first text piece dropped (undoing add_space_prefix). Bytes are not repaired, so
 *  encode followed by decode gives back the input exactly. *out (mn_malloc, NUL-terminated
 *  for convenience, owned by the caller) holds *len bytes. MN_ERANGE names a bad id. */
mn_err mn_detokenize(const mn_tokenizer *t, const int32_t *ids, int64_t n, bool render_special,
                     char **out, size_t *len, mn_errbuf *eb);

/* Streaming detokenizer: turns a token stream into text and never emits a broken
 * UTF-8 sequence; incomplete sequences are held until completed, invalid ones become
 * U+FFFD. Zero-initialise (or mn_detok_reset) before use. */
typedef struct mn_detok {
    char pending[8];
    int n_pending;
    bool started;       /* for llama: the first piece's leading space is dropped */
} mn_detok;

void mn_detok_reset(mn_detok *d);
/** Append the text of token id to out (cap bytes); returns bytes written (never more than
 *  cap; what does not fit is dropped at a character boundary; a piece of k bytes needs at
 *  most 3*(k+3) bytes, as invalid bytes become 3-byte U+FFFD). Special tokens produce
 *  their text only if render_special. */
size_t mn_detok_push(const mn_tokenizer *t, mn_detok *d, int32_t id, bool render_special,
                     char *out, size_t cap);
/** Emit whatever is pending (as U+FFFD for an incomplete sequence) at the end of a stream. */
size_t mn_detok_flush(mn_detok *d, char *out, size_t cap);

#endif
