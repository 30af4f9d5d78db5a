/* engine/tokenizer_impl.h — internals shared by tokenizer.c, tokenizer_bpe.c and
 * tokenizer_spm.c (and the unit test). Not a public interface.
 *
 * Every token has two byte strings in one arena: its raw text as stored in the GGUF
 * ("Ġthe", "▁the", "<0x0A>") and its decoded bytes (" the", " the", "\n") that
 * mn_token_bytes returns. The lookup table maps the text the encoder produces to ids:
 * decoded bytes for gpt2 (the BPE works on raw bytes, not on the Ġ alphabet), raw text
 * for llama (the SPM works on "▁"-escaped text).
 */
#ifndef MN_TOKENIZER_IMPL_H
#define MN_TOKENIZER_IMPL_H

#include "engine/tokenizer.h"

enum { MN__TOK_GPT2 = 0, MN__TOK_LLAMA = 1 };

/* tokenizer.ggml.pre kinds with their own regex; anything else uses the GPT-2 one. */
enum { MN__PRE_GPT2 = 0, MN__PRE_LLAMA3 = 1, MN__PRE_QWEN2 = 2, MN__PRE_SMOLLM = 3 };

/* tokenizer.ggml.token_type values (llama.cpp's llama_token_type). */
enum {
    MN__TT_NORMAL = 1, MN__TT_UNKNOWN = 2, MN__TT_CONTROL = 3,
    MN__TT_USER_DEFINED = 4, MN__TT_UNUSED = 5, MN__TT_BYTE = 6
};

/* A growable token vector (mn_malloc'ed). */
typedef struct mn__tokvec { int32_t *v; int64_t n, cap; } mn__tokvec;

struct mn_tokenizer {
    int kind;                   /* MN__TOK_* */
    int pre;                    /* MN__PRE_* */
    char kind_name[8];
    char pre_name[32];
    int32_t n_vocab;
    char *arena;                /* raw and decoded texts of all tokens */
    uint32_t *raw_off, *raw_len, *dec_off, *dec_len;   /* [n_vocab] */
    uint8_t *type;              /* [n_vocab] MN__TT_* */
    uint8_t *eog;               /* [n_vocab] 1 if it ends generation */
    float *score;               /* [n_vocab] (llama); NULL for gpt2 */
    int32_t *lut;               /* open-addressed text -> id, -1 = empty */
    uint32_t lut_mask;
    uint64_t *mkey;             /* merges: (left << 32 | right) -> rank, result */
    int32_t *mrank, *mres;
    uint32_t mmask;
    int32_t byte_tok[256];      /* token of one raw byte (gpt2) or <0xNN> (llama); -1 if none */
    int32_t *special;           /* CONTROL/USER_DEFINED ids, longest text first */
    int32_t n_special;
    uint8_t special_first[32];  /* bitmap of the first bytes of special texts */
    int32_t bos, eos, eot, unk;
    bool add_bos, add_space_prefix, ignore_merges;
};

mn_err mn__tokvec_push(mn__tokvec *tv, int32_t id);

/** Id whose lookup text (see above) is s[0..n), or -1. */
int32_t mn__tok_lookup(const mn_tokenizer *t, const char *s, size_t n);

/** Called for each pre-token piece text[off .. off+len); a nonzero return stops the split. */
typedef mn_err (*mn__piece_fn)(void *ctx, size_t off, size_t len);
/** Split text by the regex of pre-tokenizer kind pre (MN__PRE_*); pieces cover all bytes,
 *  in order. Invalid UTF-8 bytes are single units of no class (like punctuation). */
mn_err mn__pretok_split(int pre, const char *text, size_t len, mn__piece_fn fn, void *ctx);

/** Byte-level BPE of text (no special-token handling), appended to out. */
mn_err mn__bpe_encode(const mn_tokenizer *t, const char *text, size_t len, mn__tokvec *out);
/** Load merges from the gguf into t (gpt2 kind). */
mn_err mn__bpe_load_merges(mn_tokenizer *t, const mn_gguf *g, mn_errbuf *eb);
/** GPT-2's bytes_to_unicode: the code point standing for byte b in gpt2 token texts. */
uint32_t mn__byte_to_cp(uint8_t b);
/** Turn a gpt2 token text (Ġ alphabet) into raw bytes in out (room for len bytes);
 *  code points outside the alphabet are copied as they are. Returns the length. */
size_t mn__unmap_text(const char *s, size_t len, char *out);
/** Inverse of mn__byte_to_cp: the byte for code point cp, or -1. */
int mn__cp_to_byte(int32_t cp);

/** SentencePiece-style BPE of text (no special-token handling); space_prefix adds "▁". */
mn_err mn__spm_encode(const mn_tokenizer *t, const char *text, size_t len, bool space_prefix,
                      mn__tokvec *out);

#endif
