/* engine/comm.c — the communicator front end and the in-process (threads as ranks) group.
 *
 * Local all-reduce in two barriers: every rank publishes its buffer and size, waits for
 * all; then rank r sums elements [r*n/size, (r+1)*n/size) of every buffer in rank order
 * and writes the sum back into every buffer; a second barrier keeps any rank from
 * returning (and reusing its buffer) before all writes are done. Shared slots are written
 * only before the first barrier of a round and read only between the two, so the next
 * round cannot disturb this one.
 */
#include "engine/comm.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "engine/alloc.h"

int mn_comm_rank(const mn_comm *c) { return c->rank; }
int mn_comm_size(const mn_comm *c) { return c->size; }

mn_err mn_comm_all_reduce_sum(mn_comm *c, float *buf, size_t n, mn_errbuf *eb) {
    return c->iface->all_reduce_sum(c, buf, n, eb);
}

mn_err mn_comm_barrier(mn_comm *c, mn_errbuf *eb) { return c->iface->barrier(c, eb); }

void mn_comm_abort(mn_comm *c) {
    if (c && c->iface->abort) c->iface->abort(c);
}

void mn_comm_free(mn_comm *c) {
    if (c) c->iface->destroy(c);
}

/* ---- local group ---------------------------------------------------------------------- */

enum { LOCAL_MAX_RANKS = 64 };

typedef struct local_group {
    int size;
    atomic_int refs;              /* ranks not yet freed */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int arrived;                  /* ranks waiting at the current barrier */
    uint64_t generation;          /* barriers completed */
    bool aborted;
    float *buf[LOCAL_MAX_RANKS];  /* published by each rank for the current all-reduce */
    size_t n[LOCAL_MAX_RANKS];
} local_group;

/* Wait for all ranks (or an abort). */
static mn_err local_wait(local_group *g, int rank, mn_errbuf *eb) {
    pthread_mutex_lock(&g->mu);
    uint64_t gen = g->generation;
    if (!g->aborted && ++g->arrived == g->size) {
        g->arrived = 0;
        g->generation++;
        pthread_cond_broadcast(&g->cv);
    }
    while (!g->aborted && g->generation == gen) pthread_cond_wait(&g->cv, &g->mu);
    bool aborted = g->aborted;
    pthread_mutex_unlock(&g->mu);
    if (aborted)
        return mn_errf(eb, MN_ECANCELLED, "communicator: rank %d: the group was aborted by a failing rank", rank);
    return MN_OK;
}

static mn_err local_barrier(mn_comm *c, mn_errbuf *eb) { return local_wait(c->impl, c->rank, eb); }

static mn_err local_all_reduce_sum(mn_comm *c, float *buf, size_t n, mn_errbuf *eb) {
    local_group *g = c->impl;
    const int P = g->size;
    if (P == 1) return MN_OK;
    g->buf[c->rank] = buf;
    g->n[c->rank] = n;
    mn_err e = local_wait(g, c->rank, eb);
    if (e != MN_OK) return e;
    /* every rank sees the same sizes, so all take the same branch */
    for (int r = 1; r < P; r++)
        if (g->n[r] != g->n[0]) {
            mn_errf(eb, MN_EMISMATCH, "communicator: all_reduce sizes differ: rank 0 has %zu floats, rank %d has %zu",
                    g->n[0], r, g->n[r]);
            local_wait(g, c->rank, NULL);
            return MN_EMISMATCH;
        }
    size_t lo = n * (size_t)c->rank / (size_t)P, hi = n * (size_t)(c->rank + 1) / (size_t)P;
    for (size_t i = lo; i < hi; i++) {
        float s = g->buf[0][i];
        for (int r = 1; r < P; r++) s += g->buf[r][i];
        for (int r = 0; r < P; r++) g->buf[r][i] = s;
    }
    return local_wait(g, c->rank, eb);
}

static void local_abort(mn_comm *c) {
    local_group *g = c->impl;
    pthread_mutex_lock(&g->mu);
    g->aborted = true;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

static void local_destroy(mn_comm *c) {
    local_group *g = c->impl;
    if (atomic_fetch_sub(&g->refs, 1) == 1) {
        pthread_cond_destroy(&g->cv);
        pthread_mutex_destroy(&g->mu);
        mn_free(g);
    }
    mn_free(c);
}

static const mn_comm_iface local_iface = {
    .name = "local",
    .all_reduce_sum = local_all_reduce_sum,
    .barrier = local_barrier,
    .abort = local_abort,
    .destroy = local_destroy,
};

mn_err mn_comm_local_group_new(int n, mn_comm **ranks, mn_errbuf *eb) {
    if (n < 1 || n > LOCAL_MAX_RANKS)
        return mn_errf(eb, MN_ERANGE, "communicator: group size %d not in [1, %d]", n, LOCAL_MAX_RANKS);
    local_group *g = mn_calloc(1, sizeof *g);
    mn_comm *c[LOCAL_MAX_RANKS] = {0};
    bool ok = g != NULL;
    for (int r = 0; r < n && ok; r++) ok = (c[r] = mn_calloc(1, sizeof **c)) != NULL;
    if (!ok) {
        for (int r = 0; r < n; r++) mn_free(c[r]);
        mn_free(g);
        return mn_errf(eb, MN_ENOMEM, "communicator: out of memory for a group of %d ranks", n);
    }
    g->size = n;
    atomic_init(&g->refs, n);
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    for (int r = 0; r < n; r++) {
        *c[r] = (mn_comm){.iface = &local_iface, .rank = r, .size = n, .impl = g};
        ranks[r] = c[r];
    }
    return MN_OK;
}
