/* engine/lora.h — LoRA adapters: PEFT loading, validation, fingerprint, a registry by name.
 *
 * An adapter is a PEFT directory: adapter_config.json (r, lora_alpha, use_rslora,
 * target_modules, rank_pattern, alpha_pattern) and adapter_model.safetensors with, per
 * layer i and targeted module,
 *   base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
 *   base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight
 * A is [r, in] and B is [out, r] (F32, F16 or BF16). The delta of a weight is
 * scale * B A with scale = alpha / r (alpha / sqrt(r) with use_rslora), so a linear
 * y = x W^T becomes y = x W^T + scale * (x A^T) B^T.
 * A path ending in ".gguf" is read as a llama.cpp GGUF LoRA instead (tensors
 * blk.{i}.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}.weight.lora_{a,b},
 * adapter.lora.alpha; ranks from the tensors; scale alpha / r, or 1 when alpha is 0).
 * For "llama" models the GGUF converter permutes the rows of Q and K (rope pairs made
 * adjacent); B of q_proj and k_proj is permuted the same way at load, so adapters written
 * for the Hugging Face layout apply as trained.
 * rank_pattern / alpha_pattern keys match a module name ("model.layers.3.self_attn.q_proj")
 * by suffix at a dot boundary ("q_proj", "layers.3.self_attn.q_proj"); regular
 * expressions are not interpreted (a key matching nothing changes nothing).
 * Every failure (missing file or tensor, wrong shape or dtype, truncated file, rank 0,
 * hidden size or layer count not matching the model, unknown module) is an error naming
 * the file, tensor or field, and no adapter is returned.
 * Weights are held as host copies in the file's type when all tensors share a 16-bit type
 * (F16 or BF16: exact, and half the bytes a decode step reads), else as f32. This is the first increment: the device pool, LRU
 * paging host -> device and the shared KV/adapter budget come later, so the batched apply
 * reads these host copies directly and runs on the CPU backend only.
 * Ownership: mn_lora_load returns an adapter the caller frees with mn_lora_free; the
 * registry owns the adapters loaded into it until they are unloaded or it is freed.
 */
#ifndef MN_LORA_H
#define MN_LORA_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/err.h"
#include "engine/model.h"

typedef enum mn_lora_target {
    MN_LORA_Q, MN_LORA_K, MN_LORA_V, MN_LORA_O, MN_LORA_GATE, MN_LORA_UP, MN_LORA_DOWN,
    MN_LORA_N_TARGETS
} mn_lora_target;

/* One adapted linear of one layer; r == 0: not adapted. */
typedef struct mn_lora_mat {
    int32_t r;
    float scale;
    const void *a;         /* [r, in] of the adapter's wtype */
    const void *b;         /* [r, out] of wtype: B transposed (the expand streams rows of it) */
} mn_lora_mat;

/* Per layer. a of q, k and v are adjacent rows of one array ([r_q + r_k + r_v, n_embd]),
 * and so are gate's and up's, so one shrink serves each group. */
typedef struct mn_lora_layer {
    mn_lora_mat t[MN_LORA_N_TARGETS];
} mn_lora_layer;

typedef struct mn_lora {
    char name[128];
    int32_t n_layer, n_embd, n_q, n_kv, n_ff;   /* model shape it was validated against */
    uint32_t targets;        /* bit (1 << mn_lora_target) per targeted module */
    int32_t r_max;
    mn_lora_layer *layers;   /* [n_layer] */
    mn_dtype wtype;          /* of every A and B: F16 / BF16 if the file has only that, else F32 */
    void *arena;             /* every A and B */
    uint64_t bytes;          /* of arena */
    double load_seconds;
    uint8_t fingerprint[16]; /* XXH3-128 of the resolved ranks, scales and f32 tensor bytes:
                                equal content <=> equal fingerprint, whatever the name */
} mn_lora;

/** Load the PEFT adapter in directory dir (or the GGUF LoRA file dir, if it ends in .gguf)
 *  for model m; name is kept (truncated to 127 bytes). */
mn_err mn_lora_load(const char *dir, const char *name, const mn_model *m, mn_lora **out, mn_errbuf *eb);
void mn_lora_free(mn_lora *l);
/** "q_proj" ... "down_proj" */
const char *mn_lora_target_name(mn_lora_target t);
/** MN_OK if the adapter was validated against a model of m's shape, else MN_EMISMATCH. */
mn_err mn_lora_check_model(const mn_lora *l, const mn_model *m, mn_errbuf *eb);

/* ---- registry: adapters by name ----
 * Slots are stable: an adapter keeps its index until unloaded; the table handed to a
 * batch (mn_lora_registry_table) has NULL in free slots. */
typedef struct mn_lora_registry mn_lora_registry;

mn_err mn_lora_registry_new(const mn_model *m, mn_lora_registry **out, mn_errbuf *eb);
void mn_lora_registry_free(mn_lora_registry *r);
/** Load dir under name; a name already loaded is MN_EINVALID and keeps the old adapter. */
mn_err mn_lora_registry_load(mn_lora_registry *r, const char *name, const char *dir, int32_t *index, mn_errbuf *eb);
/** Unload name; MN_ENOT_FOUND if not loaded. */
mn_err mn_lora_registry_unload(mn_lora_registry *r, const char *name, mn_errbuf *eb);
/** Index of name, or -1. */
int32_t mn_lora_registry_find(const mn_lora_registry *r, const char *name);
/** The table of slots (some NULL) and its length, for mn_batch.adapters. */
const mn_lora *const *mn_lora_registry_table(const mn_lora_registry *r, int32_t *n);

#endif
