/* engine/kv.h — the paged KV cache: a pool of fixed-size blocks in backend memory, and
 * per-sequence block lists.
 *
 * Layout of the pool buffer (f16): [layer][K or V][block][slot][kv_head][head_dim], so
 * one layer's K (or V) of one block is a contiguous block_size*kv_dim run and a kernel
 * finds a token through mn_kv_view (kernels/ops.h). Blocks carry a reference count so
 * sequences can share full blocks later (prefix sharing, fork).
 * Ownership: the pool owns its buffer; an mn_kv_seq owns references to its blocks and is
 * released with mn_kv_seq_release (the struct itself is caller storage).
 */
#ifndef MN_KV_H
#define MN_KV_H

#include <stdint.h>

#include "engine/backend.h"
#include "engine/err.h"

typedef struct mn_kv_pool {
    mn_backend *backend;
    mn_buffer *buf;
    int32_t n_layer, n_kv_head, head_dim, block_size;
    int32_t n_blocks;
    int32_t *free_ids;     /* stack of free block ids */
    int32_t n_free;
    int32_t *refs;         /* [n_blocks] */
    int64_t block_elems;   /* block_size * n_kv_head * head_dim */
} mn_kv_pool;

typedef struct mn_kv_seq {
    int32_t *blocks;       /* mn_malloc'ed; blocks[i] holds positions [i*bs, (i+1)*bs) */
    int32_t n_blocks, cap;
    int32_t n_tokens;      /* positions written so far */
} mn_kv_seq;

/** A pool of n_blocks blocks of block_size tokens for every layer. */
mn_err mn_kv_pool_new(mn_backend *be, int32_t n_layer, int32_t n_kv_head, int32_t head_dim, int32_t block_size,
                      int32_t n_blocks, mn_kv_pool **out, mn_errbuf *eb);
void mn_kv_pool_free(mn_kv_pool *p);
/** Bytes of KV per token (all layers, K and V, f16). */
int64_t mn_kv_bytes_per_token(const mn_kv_pool *p);

/** Order the free blocks so the next reservations take ascending ids: runs of adjacent
 *  blocks, which a restore copies in one piece per layer. O(free log free). */
void mn_kv_pool_sort_free(mn_kv_pool *p);
/** Make seq own blocks for positions [0, n_tokens). MN_ELIMIT (pool full) leaves seq as it was. */
mn_err mn_kv_seq_reserve(mn_kv_pool *p, mn_kv_seq *seq, int32_t n_tokens, mn_errbuf *eb);
/** Drop every block reference of seq and reset it to empty. */
void mn_kv_seq_release(mn_kv_pool *p, mn_kv_seq *seq);

/** Take / drop one reference to a block (prefix cache, fork). Dropping the last frees it. */
void mn_kv_block_retain(mn_kv_pool *p, int32_t id);
void mn_kv_block_release(mn_kv_pool *p, int32_t id);
/** Attach an existing block at the end of seq (takes a reference). seq->n_tokens is not
 *  changed: the caller says how many positions are valid. */
mn_err mn_kv_seq_attach(mn_kv_pool *p, mn_kv_seq *seq, int32_t id, mn_errbuf *eb);
/** Make the block holding position pos private to seq before it is written: a block with
 *  other references is copied (all layers, K and V) to a fresh block. No-op past the end. */
mn_err mn_kv_seq_make_writable(mn_kv_pool *p, mn_kv_seq *seq, int32_t pos, mn_errbuf *eb);
/** Copy block src's data (all layers, K and V) over block dst; refs untouched. Waits for
 *  the copies. (make_writable's copy; a tensor-parallel group repeats it on its other
 *  ranks' pools, mn_tp_copy_block.) */
mn_err mn_kv_block_copy(mn_kv_pool *p, int32_t dst, int32_t src, mn_errbuf *eb);
/** Keep positions [0, n): drop the blocks past them; seq->n_tokens = min(n_tokens, n). */
void mn_kv_seq_truncate(mn_kv_pool *p, mn_kv_seq *seq, int32_t n);
/** dst (empty) shares every block of src. */
mn_err mn_kv_seq_clone(mn_kv_pool *p, const mn_kv_seq *src, mn_kv_seq *dst, mn_errbuf *eb);

/** The view of one layer; indptr/indices are block tables in backend memory. */
mn_kv_view mn_kv_pool_view(const mn_kv_pool *p, int32_t layer, const int32_t *indptr, const int32_t *indices);

#endif
