/* engine/threadpool.h — a fork-join pool for the CPU backend.
 *
 * mn_threadpool_run(pool, fn, arg) runs fn(arg, par) on every thread of the pool (the
 * calling thread is par->ith == 0) and returns when all are done. Inside fn, threads
 * synchronise with mn_par_barrier(par). Workers spin briefly between runs, then sleep.
 * The pool owns its threads; mn_threadpool_free joins them.
 */
#ifndef MN_THREADPOOL_H
#define MN_THREADPOOL_H

#include "engine/err.h"
#include "kernels/ops.h"

typedef struct mn_threadpool mn_threadpool;
typedef void (*mn_task_fn)(void *arg, const mn_par *par);

/** n_threads >= 1 (1: no worker threads, fn runs on the caller). */
mn_err mn_threadpool_new(int n_threads, mn_threadpool **out, mn_errbuf *eb);
void mn_threadpool_free(mn_threadpool *pool);
int mn_threadpool_size(const mn_threadpool *pool);
/** Run fn on all threads; not reentrant (one run at a time, from one thread). */
void mn_threadpool_run(mn_threadpool *pool, mn_task_fn fn, void *arg);

#endif
