/* engine/threadpool.c — spin-then-sleep fork-join pool with a sense-counting barrier.
 *
 * Why spin: a decode step runs ~300 ops, each ending in a barrier; sleeping on a condvar
 * at every barrier would cost more than the ops themselves. Between runs, workers spin a
 * short while (the next decode step usually follows at once) and then sleep. */
#include "engine/threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>

#include "engine/alloc.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define SPIN_BEFORE_SLEEP 200000

typedef struct {
    _Alignas(64) atomic_int arrived;
    _Alignas(64) atomic_int phase;
} barrier_t;

struct mn_threadpool {
    int n;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Alignas(64) atomic_uint gen;     /* incremented for every run */
    _Alignas(64) atomic_int done;     /* workers finished with the current run */
    atomic_bool stop;
    mn_task_fn fn;
    void *arg;
    barrier_t bar;
};

typedef struct { mn_threadpool *pool; int ith; } worker_arg;

static void barrier_wait(void *ctx) {
    mn_threadpool *p = ctx;
    int ph = atomic_load_explicit(&p->bar.phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&p->bar.arrived, 1, memory_order_acq_rel) == p->n - 1) {
        atomic_store_explicit(&p->bar.arrived, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&p->bar.phase, 1, memory_order_release);
    } else {
        /* spin first (the usual wait is a few microseconds); yield once it is long, so an
         * oversubscribed machine does not burn whole time slices waiting for a thread that
         * is not running */
        int spins = 0;
        while (atomic_load_explicit(&p->bar.phase, memory_order_acquire) == ph) {
            if (++spins < 4096) cpu_relax();
            else sched_yield();
        }
    }
}

static void *worker_main(void *a) {
    worker_arg *wa = a;
    mn_threadpool *p = wa->pool;
    int ith = wa->ith;
    mn_free(wa);
    unsigned seen = 0;
    for (;;) {
        unsigned g;
        int spins = 0;
        while ((g = atomic_load_explicit(&p->gen, memory_order_acquire)) == seen &&
               !atomic_load(&p->stop) && spins < SPIN_BEFORE_SLEEP) {
            cpu_relax();
            spins++;
        }
        if (g == seen && !atomic_load(&p->stop)) {
            pthread_mutex_lock(&p->mu);
            while ((g = atomic_load(&p->gen)) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->cv, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop)) break;
        seen = g;
        mn_par par = {ith, p->n, barrier_wait, p};
        p->fn(p->arg, &par);
        atomic_fetch_add_explicit(&p->done, 1, memory_order_acq_rel);
    }
    return NULL;
}

mn_err mn_threadpool_new(int n_threads, mn_threadpool **out, mn_errbuf *eb) {
    if (n_threads < 1 || n_threads > 1024)
        return mn_errf(eb, MN_EINVALID, "threads must be in [1, 1024], got %d", n_threads);
    mn_threadpool *p = mn_aligned_alloc(64, sizeof *p);
    if (!p) return mn_errf(eb, MN_ENOMEM, "thread pool: out of memory");
    memset(p, 0, sizeof *p);
    p->n = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->threads = mn_calloc((size_t)n_threads, sizeof(pthread_t));
    if (!p->threads) {
        mn_threadpool_free(p);
        return mn_errf(eb, MN_ENOMEM, "thread pool: out of memory");
    }
    for (int i = 1; i < n_threads; i++) {
        worker_arg *wa = mn_malloc(sizeof *wa);
        if (!wa || pthread_create(&p->threads[i], NULL, worker_main, (wa->pool = p, wa->ith = i, wa)) != 0) {
            mn_free(wa);
            p->n = i; /* join only the started ones */
            mn_threadpool_free(p);
            return mn_errf(eb, MN_ENOMEM, "thread pool: cannot start thread %d", i);
        }
    }
    *out = p;
    return MN_OK;
}

void mn_threadpool_free(mn_threadpool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, true);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    mn_free(p->threads);
    mn_free(p);
}

int mn_threadpool_size(const mn_threadpool *p) { return p->n; }

void mn_threadpool_run(mn_threadpool *p, mn_task_fn fn, void *arg) {
    if (p->n == 1) {
        mn_par par = {0, 1, barrier_wait, p};
        fn(arg, &par);
        return;
    }
    p->fn = fn;
    p->arg = arg;
    atomic_store(&p->done, 0);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add_explicit(&p->gen, 1, memory_order_release);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    mn_par par = {0, p->n, barrier_wait, p};
    fn(arg, &par);
    while (atomic_load_explicit(&p->done, memory_order_acquire) != p->n - 1) cpu_relax();
}
