/* engine/tp.h — a tensor-parallel group: P ranks as threads of this process.
 *
 * Rank r has its own backend (CPU ranks: a CPU backend each, an in-process communicator;
 * "cuda": GPU r, an NCCL communicator whose collectives go on that GPU's compute
 * stream), its own load of the model file (the weights are mmapped, so the ranks share
 * the page cache: nothing is copied), a KV pool holding only its
 * n_kv_head / P heads, and a forward from mn_forward_new_tp over an in-process
 * communicator (engine/comm.h). mn_tp_run hands one batch to every rank at once (rank 0
 * on the calling thread, the others on one thread each for the call) and returns rank
 * 0's logits; every rank computes the same bits. Sequences are slots [0, n_seqs): slot s
 * is one mn_kv_seq in each rank's pool, and the batch's seq field indexes slots.
 * This is what `mneme generate --tp N` and `mneme bench --tp N` run; on GPUs the same
 * forward runs over the NCCL communicator, one backend per device.
 *
 * The session engine (mn_engine_new_tp, `mneme serve --tp N`) drives a group another
 * way: its sequences are its own, in rank 0's pool (mn_tp_kv), and the engine's block
 * bookkeeping (reserve, prefix cache, copy-on-write, truncate) runs on that pool alone.
 * The other ranks' pools are only storage indexed by the same block ids: mn_tp_run_seqs
 * reserves every position of the batch in rank 0's pool first, then hands each other rank
 * a copy of rank 0's block tables, so a block id names the same positions on every rank
 * and each rank holds its own heads of them. (Replaying every reserve, attach, truncate
 * and release on every pool would keep P free lists in step; sharing the tables needs
 * only the writes of KV data mirrored.) Outside a forward KV data is written by
 * make_writable's copy of a shared block, which mn_tp_copy_block repeats on the other
 * ranks, and by the engine's tiers and session files, which copy a session between every
 * rank's pool (mn_tp_rank_kv, same block ids) and one host image holding all heads. The
 * other ranks' free lists are never used, so slots (mn_tp_run) and mn_tp_run_seqs do not
 * mix on one group.
 * Ownership: the group owns everything it made; mn_tp_free releases it. Used from one
 * thread at a time.
 */
#ifndef MN_TP_H
#define MN_TP_H

#include <stdint.h>

#include "engine/err.h"
#include "engine/forward.h"
#include "engine/model.h"

typedef struct mn_tp mn_tp;

typedef struct mn_tp_params {
    int n_ranks;               /* P >= 1 */
    const char *device;        /* NULL or "cpu": CPU ranks; "cuda": rank r on GPU r over NCCL */
    int n_threads;             /* CPU threads of each rank's backend; <= 0: 1 */
    mn_model_params model;
    int32_t block_size;        /* each rank's KV pool: blocks of block_size tokens */
    int32_t n_blocks;          /* 0: four full contexts (of min(n_ctx, 4096)), the engine's default;
                                * < 0: n_seqs full contexts of n_ctx (every slot can reach n_ctx) */
    int32_t n_seqs;            /* sequence slots, >= 1 */
} mn_tp_params;

/** Load the model at path P times and build the ranks. A P that does not divide the
 *  model's heads is MN_EINVALID naming the sizes (from mn_forward_new_tp). "cuda" needs P
 *  GPUs (MN_ERANGE naming how many there are) and a build with NCCL (MN_EUNSUPPORTED). */
mn_err mn_tp_new(const char *path, const mn_tp_params *p, mn_tp **out, mn_errbuf *eb);
void mn_tp_free(mn_tp *t);

/** Rank 0's model: config, tokenizer, chat template. */
const mn_model *mn_tp_model(const mn_tp *t);
/** Rank 0's backend (its name and thread count, for reports). */
mn_backend *mn_tp_backend(const mn_tp *t);
int mn_tp_size(const mn_tp *t);

/** mn_forward_run on every rank; b->seq indexes slots [0, n_seqs). logits: [n_out][n_vocab].
 *  A bad batch is refused by every rank alike and leaves the group usable; a failure inside
 *  the run (after which ranks may disagree) leaves it unusable: later runs are MN_EINVALID. */
mn_err mn_tp_run(mn_tp *t, const mn_batch *b, float *logits, mn_errbuf *eb);
/** mn_tp_run with adapters (lora NULL: mn_tp_run). Every rank reads the same adapters:
 *  host copies (mn_lora_load against mn_tp_model(t), or a registry without a backend),
 *  which the CPU ranks share read-only; each rank takes its share through views. CUDA
 *  ranks refuse host adapters (the forward's rule), so adapters with "cuda" ranks are not
 *  supported yet. */
mn_err mn_tp_run_lora(mn_tp *t, const mn_batch *b, const mn_batch_lora *lora, float *logits, mn_errbuf *eb);
/** Rank 0's KV pool: where mn_tp_run_seqs' sequences hold their blocks. */
mn_kv_pool *mn_tp_kv(mn_tp *t);
/** Rank r's KV pool (its n_kv_head / P heads, r in [0, P)): the engine copies a session's
 *  KV between every rank's pool and a host image that holds all heads (tiers, files). */
mn_kv_pool *mn_tp_rank_kv(mn_tp *t, int r);
/** Run a batch over sequences of rank 0's pool (mn_tp_kv) on every rank (see the top of
 *  this file): every position of the batch gets its block in rank 0's pool first (full
 *  pool: MN_ELIMIT with nothing run, blocks reserved for earlier sequences kept, as
 *  mn_forward_run), then every rank runs with those block tables, rank 0 on seqs itself
 *  (their n_tokens grow), the others on copies. lora as mn_tp_run_lora. samp (may be
 *  NULL) as mn_forward_run_sample: every rank runs the sample op on its (identical)
 *  logits with the same parameters into its own outputs, and rank 0's come back in samp;
 *  logits then gets [n_out - n_sample][n_vocab]. Errors and the unusable state as
 *  mn_tp_run. MN_EINVALID if a slot holds blocks; slots (mn_tp_run) are refused from
 *  then on. */
mn_err mn_tp_run_seqs(mn_tp *t, mn_kv_seq *const *seqs, int32_t n_seqs, const mn_batch *b, const mn_batch_lora *lora,
                      const mn_batch_sample *samp, float *logits, mn_errbuf *eb);
/** Repeat on every other rank a copy of block src over block dst that was made in rank 0's
 *  pool (mn_kv_seq_make_writable of a shared block). A failure leaves the group unusable
 *  (the ranks' KV disagree). */
mn_err mn_tp_copy_block(mn_tp *t, int32_t dst, int32_t src, mn_errbuf *eb);
/** Positions stored in slot s. */
int32_t mn_tp_seq_len(const mn_tp *t, int32_t s);
/** Empty slot s on every rank. */
void mn_tp_seq_release(mn_tp *t, int32_t s);

#endif
