/* engine/forward.h — the batched forward pass of a Llama-family model.
 *
 * One call runs one batch of tokens drawn from many sequences at different positions
 * (prefill chunks and decode tokens mixed) and returns the logits of the tokens asked for.
 *   embed -> [rmsnorm -> q,k,v (+bias) -> rope -> kv_store -> attention -> o (+= residual)
 *             -> rmsnorm -> gate, up -> silu*mul -> down (+= residual)] x L
 *   -> rmsnorm (wanted rows) -> logits
 * Plan per batch (op list, buffers, block tables), then one mn_backend_run: nothing is
 * allocated inside the layer loop. The mn_forward owns its activation and metadata
 * buffers; it borrows the model and the KV pool, which must outlive it.
 */
#ifndef MN_FORWARD_H
#define MN_FORWARD_H

#include <stdint.h>

#include "engine/comm.h"
#include "engine/err.h"
#include "engine/kv.h"
#include "engine/lora.h"
#include "engine/model.h"

typedef struct mn_batch {
    int32_t n_tokens;
    const int32_t *tokens;    /* [n_tokens] token ids */
    const int32_t *seq;       /* [n_tokens] index into the seqs array of mn_forward_run */
    const int32_t *pos;       /* [n_tokens] position of the token in its sequence */
    int32_t n_out;
    const int32_t *out_rows;  /* [n_out] batch rows whose logits are returned, in this order */
} mn_batch;

/* The adapters of a batch (optional): token i uses adapters[adapter[i]], or none when
 * adapter[i] == -1. After each adapted linear the forward adds s * (x A^T) B^T per adapter
 * over that adapter's tokens (one MN_OP_LORA per layer and linear group: qkv, o, gate/up,
 * down). A separate struct (not more mn_batch fields) so every positional mn_batch
 * initializer stays complete. */
typedef struct mn_batch_lora {
    const int32_t *adapter;            /* [n_tokens] index into adapters, -1 none; NULL = none */
    const mn_lora *const *adapters;    /* [n_adapters], entries may be NULL if unused */
    int32_t n_adapters;
} mn_batch_lora;

/* Sampling on the backend (optional): the first n_sample output rows (out_rows[0 ..
 * n_sample)) go through MN_OP_SAMPLE (kernels/ops.h) right after the output head, on the
 * backend, and only their token ids (and, with logprob non-NULL, their logprobs) come back
 * to the host; their logits never do. The other n_out - n_sample rows' logits come back
 * as without it, into logits[0 .. n_out - n_sample). The caller's arrays must stay alive
 * until the run returns (it synchronises). */
typedef struct mn_batch_sample {
    int32_t n_sample;                        /* 0 .. n_out */
    const mn_sample_params *params;          /* [n_sample] (u drawn by the caller) */
    int32_t *token;                          /* [n_sample] out */
    float *logprob;                          /* [n_sample] out; NULL: no logprobs (every n_logprobs 0) */
    int32_t *top_id; float *top_logprob;     /* [n_sample][MN_SAMPLE_MAX_TOP] out, with logprob */
} mn_batch_sample;

typedef struct mn_forward mn_forward;

mn_err mn_forward_new(const mn_model *m, mn_kv_pool *kv, mn_forward **out, mn_errbuf *eb);
/** Tensor parallelism: this forward is rank mn_comm_rank(comm) of mn_comm_size(comm) = P.
 *  Column-parallel q, k, v (whole heads: n_head / P query and n_kv_head / P kv heads per
 *  rank, kv pool with n_kv_head / P heads) and gate/up (a range of ffn features on block
 *  boundaries of w_down's type); row-parallel o and down over the same ranges, whose
 *  partial sums are all-reduced before the residual add; embedding, norms and the output
 *  head are replicated, so every rank returns the full logits. A rank's weights are views
 *  into m's (nothing copied). m is this rank's model (on this rank's backend); comm NULL
 *  or of size 1 is mn_forward_new. Every rank must run the same batches on sequences in
 *  the same state, each from its own thread. A P that does not divide the heads, or a
 *  slice that would cut a quantized block, is MN_EINVALID naming the sizes. Adapters work
 *  at any P: every rank does the whole shrink of q/k/v and gate/up and expands into its
 *  own output features; for o and down each rank shrinks its input features, and the
 *  partial v is all-reduced together with the partial sums before every rank adds the
 *  expand (views into the adapter's A and B, nothing copied). Logits differ from P = 1 by
 *  the reordered sums of o and down and of their lora shrink (f32 rounding), and are
 *  bit-identical across ranks and runs (local comm). */
mn_err mn_forward_new_tp(const mn_model *m, mn_kv_pool *kv, mn_comm *comm, mn_forward **out, mn_errbuf *eb);
void mn_forward_free(mn_forward *f);

/** Run one batch. Host arrays in; logits[n_out][n_vocab] (host) out. Blocks are reserved in
 *  each sequence for its positions, and seq->n_tokens grows to cover them. A token's
 *  position may not be past the end of its sequence (counting tokens earlier in the batch):
 *  that and every other bad field (token id, seq index, out row, context length, adapter
 *  index, an adapter loaded for another model) is MN_EINVALID/MN_ERANGE/MN_EMISMATCH naming
 *  the batch row, with nothing computed. On a backend other than cpu an adapter must be a
 *  view from a registry attached to that backend (mn_lora_registry_set_budget), else
 *  MN_EINVALID naming the row: host copies would be read by device kernels. The segment
 *  and row arrays of the lora ops are uploaded with the batch's metadata. */
mn_err mn_forward_run(mn_forward *f, mn_kv_seq *const *seqs, int32_t n_seqs, const mn_batch *b, float *logits,
                      mn_errbuf *eb);
/** Layer-wise restore: the next run's layer l waits (on the device, not the host) for
 *  ready[l] (an event of f's backend's copy queue; ticket 0: nothing) before it stores or
 *  reads KV, so layers whose KV is back compute while the rest is still copying. Calls
 *  before one run combine (the later ticket of each layer); the run consumes them, also
 *  when it fails. */
mn_err mn_forward_wait_layers(mn_forward *f, const mn_event *ready, mn_errbuf *eb);
/** mn_forward_run with adapters (lora may be NULL: the same as mn_forward_run). */
mn_err mn_forward_run_lora(mn_forward *f, mn_kv_seq *const *seqs, int32_t n_seqs, const mn_batch *b,
                           const mn_batch_lora *lora, float *logits, mn_errbuf *eb);
/** mn_forward_run_lora that samples the first samp->n_sample output rows on the backend
 *  (samp may be NULL: the same as mn_forward_run_lora). logits gets [n_out - n_sample][n_vocab].
 *  A bad sample field (n_sample outside [0, n_out], n_logprobs outside [0, MN_SAMPLE_MAX_TOP]
 *  or > 0 without logprob, u outside [0, 1)) is MN_EINVALID / MN_ERANGE naming the row, with
 *  nothing computed. */
mn_err mn_forward_run_sample(mn_forward *f, mn_kv_seq *const *seqs, int32_t n_seqs, const mn_batch *b,
                             const mn_batch_lora *lora, const mn_batch_sample *samp, float *logits, mn_errbuf *eb);

#endif
