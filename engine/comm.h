/* engine/comm.h — a communicator: the collectives tensor parallelism needs between ranks.
 *
 * One mn_comm per rank. A rank is a thread that drives one backend (one GPU, or one CPU
 * backend); the ranks of a group call every collective in the same order with the same
 * sizes. Two implementations:
 *   - local (here): ranks are threads of one process sharing memory, buffers are host
 *     memory. all_reduce_sum is deterministic: element i is summed in rank order,
 *     ((b0 + b1) + b2) + ..., by exactly one thread, and every rank receives that one
 *     value, so the result is bit-identical on every rank and independent of timing.
 *   - NCCL (engine/cuda/comm_nccl.c, CUDA builds that found NCCL: MNEME_HAVE_NCCL): ranks
 *     are GPUs of one box, buffers are device memory, collectives are enqueued on the
 *     rank's compute stream (see below).
 * A failing rank calls mn_comm_abort so the others do not wait forever: their pending and
 * later collectives return MN_ECANCELLED; the group is then unusable.
 * Ownership: each rank's mn_comm is freed with mn_comm_free (from any thread, once no
 * collective of that rank is running); state shared by the group goes with the last one.
 */
#ifndef MN_COMM_H
#define MN_COMM_H

#include <stddef.h>

#include "engine/err.h"

typedef struct mn_comm mn_comm;

/* ---- the vtable a communicator implements (private to engine/comm*.c) ---- */
typedef struct mn_comm_iface {
    const char *name;
    /* buf[0:n] (f32, in place) = the sum over ranks of every rank's buf[0:n]. */
    mn_err (*all_reduce_sum)(mn_comm *c, float *buf, size_t n, mn_errbuf *eb);
    /* Returns once every rank has called it (NCCL: and the rank's stream is idle). */
    mn_err (*barrier)(mn_comm *c, mn_errbuf *eb);
    /* Make every rank's pending and later collectives fail (MN_ECANCELLED). */
    void (*abort)(mn_comm *c);
    void (*destroy)(mn_comm *c);
} mn_comm_iface;

struct mn_comm {
    const mn_comm_iface *iface;
    int rank, size;
    void *impl;
};

/** This rank's index in [0, size) and the group size. */
int mn_comm_rank(const mn_comm *c);
int mn_comm_size(const mn_comm *c);
/** Sum buf[0:n] over the ranks, in place, on every rank. Ranks passing different n get
 *  MN_EMISMATCH naming both sizes (local). */
mn_err mn_comm_all_reduce_sum(mn_comm *c, float *buf, size_t n, mn_errbuf *eb);
mn_err mn_comm_barrier(mn_comm *c, mn_errbuf *eb);
void mn_comm_abort(mn_comm *c);
/** Free this rank's communicator (NULL is fine). */
void mn_comm_free(mn_comm *c);

/** An in-process group of n ranks (1 <= n <= 64): ranks[r] is rank r; hand each to the
 *  thread that runs that rank. On failure nothing is allocated and ranks is untouched. */
mn_err mn_comm_local_group_new(int n, mn_comm **ranks, mn_errbuf *eb);

#ifdef MNEME_HAVE_NCCL
/** An NCCL group of n ranks over devices[0:n] (ncclCommInitAll, from one thread).
 *  streams[r] is the cudaStream_t (as void *) that rank r's collectives are enqueued on:
 *  the compute stream of that rank's backend, so an all-reduce is ordered after the ops
 *  that wrote its buffer and before those that read it, without a host sync. Sums are
 *  NCCL's (identical on every rank; the order is NCCL's ring order, not rank order). */
mn_err mn_comm_nccl_group_new(int n, const int *devices, void *const *streams, mn_comm **ranks, mn_errbuf *eb);
#endif

#endif
