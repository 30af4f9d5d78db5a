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
 * (F16 or BF16: exact, and half the bytes a decode step reads), else as f32.
 * Residency (registry with a backend and a byte budget): an adapter a batch needs is copied
 * host -> device on the backend's copy queue and kept in an LRU resident set; the least
 * recently used unpinned copies are evicted to stay under the budget; adapters of a batch
 * in flight are pinned and never evicted. The budget is the registry's own: sharing one
 * budget with the KV pool (a configurable split) is a later step.
 * Ownership: mn_lora_load returns an adapter the caller frees with mn_lora_free; the
 * registry owns the adapters loaded into it until they are unloaded or it is freed.
 */
#ifndef MN_LORA_H
#define MN_LORA_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/backend.h"
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
    const mn_backend *backend; /* whose memory holds A and B: NULL for a host copy
                                  (mn_lora_load), the registry's backend for its device view */
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
/** Load dir under name; a name already loaded is MN_EINVALID and keeps the old adapter.
 *  Reads the files on the calling thread: mn_lora_registry_load = mn_lora_load +
 *  mn_lora_registry_add. */
mn_err mn_lora_registry_load(mn_lora_registry *r, const char *name, const char *dir, int32_t *index, mn_errbuf *eb);
/** Install l, an adapter mn_lora_load made (on any thread: loading needs only the model,
 *  which is immutable), under l->name. Reads no file, so a server can parse off the thread
 *  that owns the registry and install on it. On MN_OK the registry owns l (slot in *index).
 *  On failure l stays the caller's (free it with mn_lora_free) and the registry is
 *  unchanged: MN_EINVALID for an empty name or one already loaded, MN_EMISMATCH if l was
 *  loaded for a model of another shape, MN_ELIMIT if l is larger than the whole device
 *  budget, MN_ENOMEM. */
mn_err mn_lora_registry_add(mn_lora_registry *r, mn_lora *l, int32_t *index, mn_errbuf *eb);
/** Unload name; MN_ENOT_FOUND if not loaded, MN_EBUSY while pinned (a batch in flight). */
mn_err mn_lora_registry_unload(mn_lora_registry *r, const char *name, mn_errbuf *eb);
/** Index of name, or -1. */
int32_t mn_lora_registry_find(const mn_lora_registry *r, const char *name);
/** The table of slots (some NULL) and its length, for mn_batch_lora.adapters. Without a
 *  backend (no mn_lora_registry_set_budget) entries are the host adapters. With one, only
 *  the entries of slots acquired for a batch are valid for it (device views); use
 *  mn_lora_registry_acquire_batch rather than this. */
const mn_lora *const *mn_lora_registry_table(const mn_lora_registry *r, int32_t *n);
/** The host adapter in slot (its name, fingerprint, shapes), NULL for a free slot: valid
 *  whatever the residency, until that slot is unloaded. */
const mn_lora *mn_lora_registry_adapter(const mn_lora_registry *r, int32_t slot);
int32_t mn_lora_registry_n_slots(const mn_lora_registry *r);

/* ---- residency: device copies under a byte budget, LRU, pinning ----
 * Engine protocol per batch (the engine thread; one registry per model):
 *   mn_lora_registry_acquire_batch(r, adapter, T, &table, &n, eb)   before planning it:
 *       pages in what the batch needs (evicting LRU unpinned copies), waits for those
 *       copies, pins them; mn_batch_lora = {adapter, table, n} for mn_forward_run_lora;
 *   mn_lora_registry_release_batch(r, adapter, T)   after the batch's results are read
 *       back (on CUDA: after the synchronisation that returns the logits); unpins.
 *   optionally mn_lora_registry_prefetch(r, next_adapter, T2, eb) as soon as the next
 *       batch's adapters are known (before waiting on the current one), so its page-ins
 *       overlap the current compute.
 * Copies of adapters already resident cost nothing; a page-in is waited for only by the
 * batch that needs it. The source of a page-in is a page-locked (MN_MEM_HOST_PINNED) copy
 * of the adapter made at its first page-in and kept until unload or detach (a second host
 * copy: the price of an async DMA), or the pageable arena when the pinned budget is full. */

/* Counters since the registry was made. */
typedef struct mn_lora_stats {
    uint64_t page_ins, evictions;  /* copies host -> device; copies dropped for room */
    uint64_t bytes_in;             /* bytes copied host -> device */
    double page_in_seconds;        /* enqueue + wait time of those copies */
    int32_t resident;              /* adapters with a device copy now */
    uint64_t resident_bytes;       /* their bytes */
    size_t budget;                 /* 0 = unlimited */
    uint64_t unstaged;             /* page-ins copied from pageable memory (pinned budget full) */
} mn_lora_stats;

/** Attach backend be (NULL: detach, batches read the host copies) with a budget of bytes
 *  for device copies (0 = unlimited). Copies over a smaller budget are evicted at once (LRU
 *  first). MN_EBUSY while any adapter is pinned; MN_ELIMIT, naming both sizes, if a loaded
 *  adapter is larger than the whole budget (and a later load of one is refused the same way). The buffers come from be's MN_MEM_DEVICE
 *  memory (its own budget applies too); be must outlive the registry or be detached. */
mn_err mn_lora_registry_set_budget(mn_lora_registry *r, mn_backend *be, size_t bytes, mn_errbuf *eb);
/** Make the adapters of per-token indices adapter[0..n_tokens) (-1 = none) resident and
 *  pin them; *table / *n_table are for mn_batch_lora (valid until the next registry call
 *  that loads, unloads or changes the budget). An adapter larger than the whole budget,
 *  or one that cannot fit beside the pinned ones, is MN_ELIMIT naming the sizes; a bad
 *  index is MN_EINVALID. On failure nothing is pinned by this call. */
mn_err mn_lora_registry_acquire_batch(mn_lora_registry *r, const int32_t *adapter, int32_t n_tokens,
                                      const mn_lora *const **table, int32_t *n_table, mn_errbuf *eb);
/** Start the page-ins the next batch (per-token indices, as acquire) will need, without
 *  waiting or pinning, so the copies overlap the batch now computing; acquire then only
 *  waits for them. May evict unpinned copies; MN_ELIMIT / MN_EINVALID as acquire. A no-op
 *  without a backend. */
mn_err mn_lora_registry_prefetch(mn_lora_registry *r, const int32_t *adapter, int32_t n_tokens, mn_errbuf *eb);
/** Unpin what mn_lora_registry_acquire_batch pinned for the same adapter array. */
void mn_lora_registry_release_batch(mn_lora_registry *r, const int32_t *adapter, int32_t n_tokens);
/** Pin slots[0..n) (made resident as acquire does); each pin is undone by one unpin. */
mn_err mn_lora_registry_pin(mn_lora_registry *r, const int32_t *slots, int32_t n, mn_errbuf *eb);
void mn_lora_registry_unpin(mn_lora_registry *r, const int32_t *slots, int32_t n);
bool mn_lora_registry_pinned(const mn_lora_registry *r, int32_t slot);
/** Whether slot has a device copy now (GET /v1/adapters: "device" or "host"). */
bool mn_lora_registry_resident(const mn_lora_registry *r, int32_t slot);
void mn_lora_registry_stats(const mn_lora_registry *r, mn_lora_stats *out);

#endif
