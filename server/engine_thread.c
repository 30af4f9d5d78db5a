/* server/engine_thread.c — see engine_thread.h.
 *
 * Queues are singly linked FIFO lists (head, tail) under one mutex; the engine thread
 * swaps the whole job list out and runs it unlocked, so a job that posts events or
 * another job never deadlocks. */
#include "server/engine_thread.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

#include "engine/alloc.h"

typedef struct fifo {
    mn_et_item *head, *tail;
    int32_t n;
} fifo;

struct mn_et {
    mn_engine *e;
    uv_thread_t thread;
    uv_mutex_t mu;
    uv_cond_t cv;
    uv_async_t async;
    fifo jobs, events;   /* under mu */
    fifo deferred;       /* engine thread only */
    bool stop;           /* under mu */
    bool stopped;        /* under mu: mn_et_stop returned; posts and defers are dropped */
    bool started;
    mn_et_stats st;      /* under mu */
};

static void fifo_push(fifo *q, mn_et_item *it) {
    it->next = NULL;
    if (q->tail) q->tail->next = it;
    else q->head = it;
    q->tail = it;
    q->n++;
}

static mn_et_item *fifo_take(fifo *q) {
    mn_et_item *h = q->head;
    q->head = q->tail = NULL;
    q->n = 0;
    return h;
}

static void run_list(mn_et_item *it) {
    while (it) {
        mn_et_item *next = it->next;   /* fn may free the item's owner */
        it->next = NULL;
        it->fn(it->ud);
        it = next;
    }
}

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void run_deferred(mn_et *et) {
    while (et->deferred.head) run_list(fifo_take(&et->deferred));
}

static void engine_main(void *arg) {
    mn_et *et = arg;
    for (;;) {
        uv_mutex_lock(&et->mu);
        while (!et->jobs.head && !et->stop && !mn_engine_has_work(et->e)) uv_cond_wait(&et->cv, &et->mu);
        bool stop = et->stop && !et->jobs.head;
        mn_et_item *jobs = fifo_take(&et->jobs);
        uv_mutex_unlock(&et->mu);
        if (stop) break;
        for (mn_et_item *it = jobs; it;) {   /* each job's deferred work runs right after it */
            mn_et_item *next = it->next;
            it->next = NULL;
            it->fn(it->ud);
            run_deferred(et);
            it = next;
        }
        int32_t batch = 0;
        bool did = false;
        double busy = 0;
        mn_err err = MN_OK;
        mn_errbuf eb = {{0}};
        mn_engine_stats before, after;
        mn_engine_stats_get(et->e, &before);
        if (mn_engine_has_work(et->e)) {
            double t0 = mono();
            err = mn_engine_step(et->e, &did, &eb);
            busy = mono() - t0;
            if (err != MN_OK) fprintf(stderr, "mneme serve: engine step failed: %s\n", eb.msg);
        }
        run_deferred(et);
        mn_engine_stats_get(et->e, &after);
        batch = (int32_t)(after.computed_tokens - before.computed_tokens);
        uv_mutex_lock(&et->mu);
        et->st.engine = after;
        if (did && batch > 0) {
            int b = 0;
            while (b < 11 && (1 << b) < batch) b++;
            et->st.batch_hist[b]++;
            et->st.steps++;
            et->st.batch_tokens_sum += batch;
            et->st.last_batch = batch;
        }
        if (err != MN_OK) et->st.step_errors++;
        et->st.busy_seconds += busy;
        uv_mutex_unlock(&et->mu);
        /* A step that fails without ending the generations that caused it would spin:
         * back off a little (the error is per-session in the engine; this is a last guard). */
        if (err != MN_OK) uv_sleep(10);
        else if (!did && busy > 0) uv_sleep(1);   /* work reported but none possible this step: do not spin */
    }
    run_deferred(et);
}

static void on_async(uv_async_t *h) {
    mn_et *et = h->data;
    uv_mutex_lock(&et->mu);
    mn_et_item *ev = fifo_take(&et->events);
    uv_mutex_unlock(&et->mu);
    run_list(ev);
}

static void free_on_close(uv_handle_t *h) {
    mn_et *et = h->data;
    uv_cond_destroy(&et->cv);
    uv_mutex_destroy(&et->mu);
    mn_free(et);
}

mn_err mn_et_start(uv_loop_t *loop, mn_engine *e, mn_et **out, mn_errbuf *eb) {
    mn_et *et = mn_calloc(1, sizeof *et);
    if (!et) return mn_errf(eb, MN_ENOMEM, "out of memory");
    et->e = e;
    if (uv_mutex_init(&et->mu) != 0) {
        mn_free(et);
        return mn_errf(eb, MN_ENOMEM, "cannot create a mutex");
    }
    if (uv_cond_init(&et->cv) != 0) {
        uv_mutex_destroy(&et->mu);
        mn_free(et);
        return mn_errf(eb, MN_ENOMEM, "cannot create a condition variable");
    }
    int rc = uv_async_init(loop, &et->async, on_async);
    if (rc != 0) {
        uv_cond_destroy(&et->cv);
        uv_mutex_destroy(&et->mu);
        mn_free(et);
        return mn_errf(eb, MN_EIO, "uv_async_init: %s", uv_strerror(rc));
    }
    et->async.data = et;
    mn_engine_stats_get(e, &et->st.engine);
    if ((rc = uv_thread_create(&et->thread, engine_main, et)) != 0) {
        uv_close((uv_handle_t *)&et->async, free_on_close);   /* freed when the loop runs the close */
        return mn_errf(eb, MN_EIO, "cannot start the engine thread: %s", uv_strerror(rc));
    }
    et->started = true;
    *out = et;
    return MN_OK;
}

void mn_et_post_job(mn_et *et, mn_et_item *it) {
    uv_mutex_lock(&et->mu);
    if (et->stopped) { /* no thread left to run it */
        uv_mutex_unlock(&et->mu);
        return;
    }
    fifo_push(&et->jobs, it);
    et->st.jobs_queued = et->jobs.n;
    uv_cond_signal(&et->cv);
    uv_mutex_unlock(&et->mu);
}

void mn_et_post_event(mn_et *et, mn_et_item *it) {
    uv_mutex_lock(&et->mu);
    if (et->stopped) { /* the async handle is closed: nothing would run it */
        uv_mutex_unlock(&et->mu);
        return;
    }
    bool first = !et->events.head;
    fifo_push(&et->events, it);
    uv_mutex_unlock(&et->mu);
    if (first) uv_async_send(&et->async);   /* coalesced by libuv anyway; skip the syscall when pending */
}

void mn_et_defer(mn_et *et, mn_et_item *it) {
    uv_mutex_lock(&et->mu);
    bool stopped = et->stopped;
    uv_mutex_unlock(&et->mu);
    if (!stopped) fifo_push(&et->deferred, it);   /* after stop (mn_engine_free's callbacks): dropped */
}

mn_engine *mn_et_engine(mn_et *et) { return et->e; }

void mn_et_stats_get(mn_et *et, mn_et_stats *out) {
    uv_mutex_lock(&et->mu);
    et->st.jobs_queued = et->jobs.n;
    *out = et->st;
    uv_mutex_unlock(&et->mu);
}

void mn_et_stop(mn_et *et) {
    if (!et->started) return;
    uv_mutex_lock(&et->mu);
    et->stop = true;
    uv_cond_signal(&et->cv);
    uv_mutex_unlock(&et->mu);
    uv_thread_join(&et->thread);
    et->started = false;
    on_async(&et->async);   /* events the last jobs posted */
    uv_mutex_lock(&et->mu);
    et->stopped = true;
    uv_mutex_unlock(&et->mu);
    uv_close((uv_handle_t *)&et->async, NULL);
}

void mn_et_free(mn_et *et) {
    if (!et) return;
    uv_cond_destroy(&et->cv);
    uv_mutex_destroy(&et->mu);
    mn_free(et);
}
