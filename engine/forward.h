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

#include "engine/err.h"
#include "engine/kv.h"
#include "engine/model.h"

typedef struct mn_batch {
    int32_t n_tokens;
    const int32_t *tokens;    /* [n_tokens] token ids */
    const int32_t *seq;       /* [n_tokens] index into the seqs array of mn_forward_run */
    const int32_t *pos;       /* [n_tokens] position of the token in its sequence */
    int32_t n_out;
    const int32_t *out_rows;  /* [n_out] batch rows whose logits are returned, in this order */
} mn_batch;

typedef struct mn_forward mn_forward;

mn_err mn_forward_new(const mn_model *m, mn_kv_pool *kv, mn_forward **out, mn_errbuf *eb);
void mn_forward_free(mn_forward *f);

/** Run one batch. Host arrays in; logits[n_out][n_vocab] (host) out. Blocks are reserved in
 *  each sequence for its positions, and seq->n_tokens grows to cover them. A token's
 *  position may not be past the end of its sequence (counting tokens earlier in the batch):
 *  that and every other bad field (token id, seq index, out row, context length) is
 *  MN_EINVALID/MN_ERANGE naming the batch row, with nothing computed. */
mn_err mn_forward_run(mn_forward *f, mn_kv_seq *const *seqs, int32_t n_seqs, const mn_batch *b, float *logits,
                      mn_errbuf *eb);

#endif
