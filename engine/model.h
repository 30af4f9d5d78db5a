/* engine/model.h — a Llama-family model loaded from GGUF onto a backend.
 *
 * Supported architectures: "llama" (Llama 2/3/3.x incl. llama3 rope scaling via the
 * rope_freqs tensor, Mistral, SmolLM2, TinyLlama) and "qwen2" (QKV bias, NEOX rope).
 * Every tensor's presence, type and shape is checked at load; a mismatch is MN_EFORMAT
 * naming the tensor and the expected and found shapes.
 * The model owns its mn_gguf (the mmap its weights point into on the CPU backend), its
 * tokenizer and its chat template; mn_model_free releases all of them. The backend must
 * outlive the model.
 */
#ifndef MN_MODEL_H
#define MN_MODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/backend.h"
#include "engine/chat.h"
#include "engine/err.h"
#include "engine/gguf.h"
#include "engine/tokenizer.h"

typedef struct mn_model_config {
    char arch[32];
    int32_t n_layer, n_embd, n_head, n_kv_head, head_dim, n_ff, n_vocab;
    int32_t n_rot;              /* rotated dims per head */
    int32_t rope_mode;          /* MN_ROPE_NORM (llama) or MN_ROPE_NEOX (qwen2) */
    float rope_base, rope_freq_scale, rms_eps;
    int32_t n_ctx_train;        /* from the file */
    int32_t n_ctx;              /* in use: n_ctx_train unless overridden */
    bool qkv_bias, tied_output, rope_llama3;
} mn_model_config;

/* A weight matrix in backend memory: N rows of K elements of type, row n at data + n*row_bytes. */
typedef struct mn_weight {
    const void *data;
    mn_dtype type;
    int64_t K, N, row_bytes;
} mn_weight;

typedef struct mn_layer {
    const float *attn_norm, *ffn_norm;   /* [n_embd] f32 */
    const float *bq, *bk, *bv;           /* qwen2 biases or NULL */
    mn_weight wq, wk, wv, wo, w_gate, w_up, w_down;
} mn_layer;

typedef struct mn_model {
    mn_model_config cfg;
    mn_gguf *gguf;
    mn_backend *backend;
    mn_tokenizer *tok;
    bool has_chat_template;
    mn_chat_template chat;
    mn_weight tok_embd;          /* [n_vocab rows, n_embd] */
    mn_weight output;            /* [n_vocab rows, n_embd]; == tok_embd when tied */
    const float *output_norm;
    mn_layer *layers;
    float *inv_freq;             /* [n_rot/2] in backend memory */
    mn_buffer *owned;            /* f32 copies of non-f32 norm/bias tensors and inv_freq */
    char name[128];
    uint8_t fingerprint[16];     /* XXH3-128 of the whole model file: sessions saved under
                                    another model (or another version of it) are refused */
    void *synth;                 /* mn_model_synthetic: the host arena of its weights */
    uint64_t synth_bytes;
} mn_model;

typedef struct mn_model_params {
    int32_t n_ctx;               /* 0: the file's context length */
} mn_model_params;

/** The default model's file name, and where mneme looks for it: $MNEME_MODEL, else
 *  $MNEME_MODELS/<file>, else ~/.cache/mneme/<file> (where tools/setup.sh puts it). The
 *  returned string is static storage (one per process; not for concurrent first calls). */
#define MN_DEFAULT_MODEL_FILE "SmolLM2-135M-Instruct.Q4_1.gguf"
const char *mn_model_default_path(void);

/** The config of the model file at path, read from its metadata alone (no weights touched;
 *  n_ctx is the file's training context): to size things before loading, e.g. each tensor-
 *  parallel rank's KV pool from a memory budget. Errors as mn_model_load's. */
mn_err mn_model_read_config(const char *path, mn_model_config *c, mn_errbuf *eb);

/** Load the model at path onto be. */
mn_err mn_model_load(const char *path, mn_backend *be, const mn_model_params *p, mn_model **out, mn_errbuf *eb);
void mn_model_free(mn_model *m);
/** A llama model of the given shape (n_layer, n_embd, n_head, n_kv_head, head_dim, n_ff,
 *  n_vocab, n_ctx_train; rope_base / rms_eps 0: llama3's 500000 / 1e-5) whose weights are
 *  random blocks of type (F32, F16, BF16, Q8_0, Q4_0) drawn from seed, made in host memory
 *  and mapped onto be: for benchmarks at shapes nobody downloads here (Llama-3-8B on a
 *  GPU). No tokenizer: feed token ids. A bad shape is MN_EINVALID naming it. */
mn_err mn_model_synthetic(mn_backend *be, const mn_model_config *shape, mn_dtype type, uint64_t seed, mn_model **out,
                          mn_errbuf *eb);

/** Bytes of weights (as stored) — for reports and the bandwidth floor. */
uint64_t mn_model_weight_bytes(const mn_model *m);

#endif
