/* server/engine_thread.h — the engine's own thread, and the two queues that connect it to
 * the libuv loop thread.
 *
 * The engine thread sleeps on a condition variable until a job arrives or the engine has
 * work; it runs every queued job, then one mn_engine_step, and repeats. Jobs are the only
 * way the loop thread reaches the engine. In the other direction the engine thread posts
 * events; a uv_async wakes the loop, which runs them. Neither side ever waits for the
 * other: posting takes a mutex for a few pointer writes and never blocks on work.
 *
 * Items are intrusive (mn_et_item lives inside the caller's struct), so posting cannot
 * fail for lack of memory. An item may be queued once at a time; its owner keeps it alive
 * until its function has run.
 */
#ifndef MN_ENGINE_THREAD_H
#define MN_ENGINE_THREAD_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "engine/err.h"
#include "engine/session.h"

typedef struct mn_et mn_et;

typedef struct mn_et_item {
    struct mn_et_item *next;
    void (*fn)(void *ud);   /* jobs run on the engine thread, events on the loop thread */
    void *ud;
} mn_et_item;

/** Snapshot of the engine thread's counters, readable from the loop thread. */
typedef struct mn_et_stats {
    mn_engine_stats engine;       /* as of the last step or job */
    int64_t steps;                /* engine steps that did work */
    int64_t batch_hist[12];       /* steps by tokens in the batch: <=1,2,4,...,1024,more */
    int64_t batch_tokens_sum;
    int32_t last_batch;
    int32_t jobs_queued;          /* jobs waiting for the engine thread now */
    int64_t step_errors;
    double busy_seconds;          /* time spent inside mn_engine_step */
} mn_et_stats;

/** Start the engine thread for e (the thread drives e from now on; e must outlive it).
 *  Must be called on the loop thread (it creates the uv_async). */
mn_err mn_et_start(uv_loop_t *loop, mn_engine *e, mn_et **out, mn_errbuf *eb);
/** Queue a job for the engine thread (any thread). */
void mn_et_post_job(mn_et *et, mn_et_item *it);
/** Queue an event for the loop thread (any thread). */
void mn_et_post_event(mn_et *et, mn_et_item *it);
/** Engine thread only: run it after the current job or step returns (e.g. free a session
 *  from a callback that runs inside mn_engine_step). */
void mn_et_defer(mn_et *et, mn_et_item *it);
/** The engine; only jobs and engine callbacks may use it. */
mn_engine *mn_et_engine(mn_et *et);
void mn_et_stats_get(mn_et *et, mn_et_stats *out);
/** Loop thread: ask the engine thread to exit once its job queue is empty, join it, close
 *  the async handle (events still queued are run first). From then on mn_et_post_job,
 *  mn_et_post_event and mn_et_defer are no-ops (their items never run: callbacks that fire
 *  while the engine is freed may still post). */
void mn_et_stop(mn_et *et);
/** After mn_et_stop, after the loop has run the close callback (uv_run), and after
 *  mn_engine_free (whose callbacks may still post to it). */
void mn_et_free(mn_et *et);

#endif
