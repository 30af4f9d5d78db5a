/* engine/cuda/comm_nccl.c — the NCCL communicator (engine/comm.h): ranks are the GPUs of
 * one box, one ncclComm_t each, created together by ncclCommInitAll.
 *
 * Collectives are enqueued on the rank's stream (the compute stream of its backend) and
 * return without waiting: the all-reduce runs after the ops that wrote the buffer and
 * before those enqueued later that read it. barrier is a one-float all-reduce followed by
 * a stream synchronize. abort calls ncclCommAbort on every rank's communicator (NCCL
 * allows this from another thread to free ranks stuck in a collective); afterwards every
 * collective of the group returns MN_ECANCELLED and destroy skips the aborted handles.
 * Built only when CMake finds NCCL (MNEME_HAVE_NCCL); never run on a machine without GPUs.
 */
#ifdef MNEME_HAVE_NCCL

#include <cuda_runtime.h>
#include <nccl.h>
#include <stdatomic.h>
#include <stdbool.h>

#include "engine/alloc.h"
#include "engine/comm.h"
#include "kernels/cuda/ops_cuda.h"

/* MN_CUDA_CHECK's twin for an ncclResult_t expression. */
#define MN_NCCL_CHECK(eb, stmt)                                                                       \
    do {                                                                                              \
        ncclResult_t mn__nr = (stmt);                                                                 \
        if (mn__nr != ncclSuccess)                                                                    \
            return mn_errf((eb), MN_EDEVICE, "%s:%d: %s: %s", __FILE__, __LINE__, #stmt,              \
                           ncclGetErrorString(mn__nr));                                               \
    } while (0)

enum { NCCL_MAX_RANKS = 64 };

typedef struct nccl_group {
    int size;
    atomic_int refs;
    atomic_bool aborted;
    ncclComm_t comms[NCCL_MAX_RANKS];
} nccl_group;

typedef struct nccl_rank {
    nccl_group *g;
    int device;
    cudaStream_t stream;
    float *one;            /* device scratch of one float for barrier */
} nccl_rank;

static mn_err cancelled(const mn_comm *c, mn_errbuf *eb) {
    return mn_errf(eb, MN_ECANCELLED, "communicator: rank %d: the NCCL group was aborted by a failing rank", c->rank);
}

static mn_err nccl_all_reduce_sum(mn_comm *c, float *buf, size_t n, mn_errbuf *eb) {
    nccl_rank *r = c->impl;
    if (atomic_load(&r->g->aborted)) return cancelled(c, eb);
    MN_CUDA_CHECK(eb, cudaSetDevice(r->device));
    MN_NCCL_CHECK(eb, ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, r->g->comms[c->rank], r->stream));
    return MN_OK;
}

static mn_err nccl_barrier(mn_comm *c, mn_errbuf *eb) {
    nccl_rank *r = c->impl;
    if (atomic_load(&r->g->aborted)) return cancelled(c, eb);
    MN_CUDA_CHECK(eb, cudaSetDevice(r->device));
    MN_NCCL_CHECK(eb, ncclAllReduce(r->one, r->one, 1, ncclFloat, ncclSum, r->g->comms[c->rank], r->stream));
    MN_CUDA_CHECK(eb, cudaStreamSynchronize(r->stream));
    return atomic_load(&r->g->aborted) ? cancelled(c, eb) : MN_OK;
}

static void nccl_abort(mn_comm *c) {
    nccl_group *g = ((nccl_rank *)c->impl)->g;
    if (atomic_exchange(&g->aborted, true)) return;
    for (int i = 0; i < g->size; i++)
        if (g->comms[i]) ncclCommAbort(g->comms[i]);
}

/* Release one rank; the group goes with the last one. Errors are ignored: nobody is left
 * to report them to. */
static void nccl_destroy(mn_comm *c) {
    nccl_rank *r = c->impl;
    nccl_group *g = r->g;
    if (r->one) {
        cudaSetDevice(r->device);
        cudaFree(r->one);
    }
    if (!atomic_load(&g->aborted) && g->comms[c->rank]) ncclCommDestroy(g->comms[c->rank]);
    mn_free(r);
    mn_free(c);
    if (atomic_fetch_sub(&g->refs, 1) == 1) mn_free(g);
}

static const mn_comm_iface nccl_iface = {
    .name = "nccl",
    .all_reduce_sum = nccl_all_reduce_sum,
    .barrier = nccl_barrier,
    .abort = nccl_abort,
    .destroy = nccl_destroy,
};

/* The per-rank parts after ncclCommInitAll succeeded. */
static mn_err make_ranks(nccl_group *g, const int *devices, void *const *streams, mn_comm **c, mn_errbuf *eb) {
    for (int i = 0; i < g->size; i++) {
        nccl_rank *r = mn_calloc(1, sizeof *r);
        if (!r || !(c[i] = mn_calloc(1, sizeof **c))) {
            mn_free(r);
            return mn_errf(eb, MN_ENOMEM, "communicator: out of memory");
        }
        *r = (nccl_rank){.g = g, .device = devices[i], .stream = (cudaStream_t)streams[i]};
        *c[i] = (mn_comm){.iface = &nccl_iface, .rank = i, .size = g->size, .impl = r};
        MN_CUDA_CHECK(eb, cudaSetDevice(devices[i]));
        MN_CUDA_CHECK(eb, cudaMalloc((void **)&r->one, sizeof(float)));
        MN_CUDA_CHECK(eb, cudaMemset(r->one, 0, sizeof(float)));
    }
    return MN_OK;
}

mn_err mn_comm_nccl_group_new(int n, const int *devices, void *const *streams, mn_comm **ranks, mn_errbuf *eb) {
    if (n < 1 || n > NCCL_MAX_RANKS)
        return mn_errf(eb, MN_ERANGE, "communicator: NCCL group size %d not in [1, %d]", n, NCCL_MAX_RANKS);
    int n_dev = 0;
    cudaError_t ce = cudaGetDeviceCount(&n_dev);
    if (ce != cudaSuccess)
        return mn_errf(eb, MN_EUNSUPPORTED, "communicator: no CUDA device: %s", cudaGetErrorString(ce));
    for (int i = 0; i < n; i++)
        if (devices[i] < 0 || devices[i] >= n_dev)
            return mn_errf(eb, MN_ERANGE, "communicator: rank %d: device %d not in [0, %d)", i, devices[i], n_dev);
    nccl_group *g = mn_calloc(1, sizeof *g);
    if (!g) return mn_errf(eb, MN_ENOMEM, "communicator: out of memory");
    g->size = n;
    atomic_init(&g->refs, n);
    atomic_init(&g->aborted, false);
    ncclResult_t nr = ncclCommInitAll(g->comms, n, devices);
    if (nr != ncclSuccess) {
        mn_free(g);
        return mn_errf(eb, MN_EDEVICE, "communicator: ncclCommInitAll over %d devices: %s", n, ncclGetErrorString(nr));
    }
    mn_comm *c[NCCL_MAX_RANKS] = {0};
    mn_err e = make_ranks(g, devices, streams, c, eb);
    if (e != MN_OK) {
        /* ranks not made yet still count in refs: free what exists, then the group */
        for (int i = 0; i < n; i++) {
            if (c[i]) {
                nccl_rank *r = c[i]->impl;
                if (r->one) cudaFree(r->one);
                mn_free(r);
                mn_free(c[i]);
            }
            ncclCommDestroy(g->comms[i]);
        }
        mn_free(g);
        return e;
    }
    for (int i = 0; i < n; i++) ranks[i] = c[i];
    return MN_OK;
}

#else
typedef int mn__comm_nccl_not_built;   /* keeps the translation unit non-empty */
#endif
