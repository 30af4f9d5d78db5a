/* engine/threadpool.c — spin-then-sleep fork-join pool with a sense-counting barrier.
 *
 * Why spin: a decode step runs ~300 ops, each ending in a barrier; sleeping at every
 * barrier would cost more than the ops themselves. Why then sleep (futex): on a machine
 * with more runnable threads than cores, the thread a barrier waits for may not be
 * running; a waiter that spins or sched_yield()s keeps its core, and each barrier can cost
 * a whole time slice (decode measured 8x slower than one thread under load). A waiter
 * that has spun ~50 us leaves the run queue instead, so the lagging thread gets a core.
 * Between runs, workers spin a short while (the next step usually follows at once) and
 * then sleep. */
#include "engine/threadpool.h"

#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "engine/alloc.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define SPIN_BEFORE_SLEEP 200000
#define BARRIER_SPIN_NS 50000   /* longer than a normal imbalance, far shorter than a time slice */

typedef struct {
    _Alignas(64) atomic_int arrived;
    _Alignas(64) atomic_int phase;
    atomic_int sleepers;          /* waiters parked on phase */
} barrier_t;

struct mn_threadpool {
    int n;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Alignas(64) atomic_uint gen;     /* incremented for every run */
    _Alignas(64) atomic_int done;     /* workers finished with the current run */
    atomic_int main_sleeping;         /* the caller of run is parked on done */
    atomic_bool stop;
    mn_task_fn fn;
    void *arg;
    barrier_t bar;
};

typedef struct { mn_threadpool *pool; int ith; } worker_arg;

static void futex_wait(atomic_int *addr, int val) {
    syscall(SYS_futex, (int *)addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}

static void futex_wake_all(atomic_int *addr) { syscall(SYS_futex, (int *)addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0); }

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Spin until *addr != val, for at most BARRIER_SPIN_NS; true if it changed. */
static bool spin_while_equal(atomic_int *addr, int val) {
    int64_t t0 = 0;
    for (int i = 0;; i++) {
        if (atomic_load_explicit(addr, memory_order_acquire) != val) return true;
        cpu_relax();
        if ((i & 255) == 255) { /* the clock read costs ~20 ns: only now and then */
            int64_t t = now_ns();
            if (!t0) t0 = t;
            else if (t - t0 > BARRIER_SPIN_NS) return false;
        }
    }
}

static void barrier_wait(void *ctx) {
    mn_threadpool *p = ctx;
    int ph = atomic_load_explicit(&p->bar.phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&p->bar.arrived, 1, memory_order_acq_rel) == p->n - 1) {
        atomic_store_explicit(&p->bar.arrived, 0, memory_order_relaxed);
        atomic_fetch_add(&p->bar.phase, 1);                 /* seq_cst: ordered against sleepers */
        if (atomic_load(&p->bar.sleepers) > 0) futex_wake_all(&p->bar.phase);
    } else if (!spin_while_equal(&p->bar.phase, ph)) {
        /* either the last arriver sees sleepers > 0 and wakes us, or we see its new phase
         * (both sides seq_cst), so no wake is lost */
        atomic_fetch_add(&p->bar.sleepers, 1);
        while (atomic_load(&p->bar.phase) == ph) futex_wait(&p->bar.phase, ph);
        atomic_fetch_sub(&p->bar.sleepers, 1);
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
        atomic_fetch_add(&p->done, 1);
        if (atomic_load(&p->main_sleeping)) futex_wake_all(&p->done);
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
    for (;;) { /* the workers' end of the run: spin briefly, then park as in the barrier */
        int d = atomic_load_explicit(&p->done, memory_order_acquire);
        if (d == p->n - 1) break;
        if (spin_while_equal(&p->done, d)) continue;
        atomic_store(&p->main_sleeping, 1);
        if (atomic_load(&p->done) == d) futex_wait(&p->done, d);
        atomic_store(&p->main_sleeping, 0);
    }
}
