/* tests/unit/test_engine_thread.c — the engine thread's shutdown contract (server/engine_thread.h),
 * in the order `mneme serve` uses: mn_et_stop, the loop's close callbacks, mn_engine_free,
 * mn_et_free.
 *
 * A generation is started from a job and is still running when the thread stops. Freeing the
 * engine then ends it, and its done callback posts an event and defers an item as the
 * server's callbacks do: both must be dropped (never run, never queued), as must a job
 * posted after the stop; the items posted before the stop have run. Under ASan (tools/test.sh)
 * a post into a freed or closed queue would also be reported here.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/session.h"
#include "server/engine_thread.h"
#include "tests/unit/test_model.h"

typedef struct ctx {
    mn_et *et;
    mn_session *s;
    mn_et_item ev_done, deferred, late_job, before_stop;
    int tokens_seen, done_calls, ev_runs, deferred_runs, late_runs, before_runs;
    bool started;
} ctx;

static void count(void *p) { ++*(int *)p; }

static bool on_token(void *ud, int32_t token, const char *text, size_t len, const mn_sample_info *info) {
    (void)token, (void)text, (void)len, (void)info;
    ctx *c = ud;
    c->tokens_seen++;
    return true;
}

static void on_done(void *ud, const mn_gen_result *res, mn_err err, const char *msg) {
    (void)res, (void)err, (void)msg;
    ctx *c = ud;
    c->done_calls++;
    mn_et_post_event(c->et, &c->ev_done);   /* as api_openai.c's on_done does */
    mn_et_defer(c->et, &c->deferred);
}

static void start_job(void *ud) {
    ctx *c = ud;
    mn_engine *e = mn_et_engine(c->et);
    mn_errbuf eb = {{0}};
    if (mn_session_create(e, NULL, &c->s, &eb) != MN_OK) return;
    const int32_t prompt[4] = {1, 2, 3, 4};
    if (mn_session_submit_tokens(e, c->s, prompt, 4, MN_ROLE_NONE, &eb) != MN_OK) return;
    mn_gen_params gp = {.sampling = mn_sampling_defaults(), .max_tokens = 4000};
    c->started = mn_session_generate_start(e, c->s, &gp, on_token, on_done, c, &eb) == MN_OK;
    if (!c->started) fprintf(stderr, "generate_start: %s\n", eb.msg);
}

static void test_stop_then_free_engine(void **state) {
    (void)state;
    const char *path = mn_test_model_path();
    mn_errbuf eb = {{0}};
    mn_backend *be;
    mn_model *m;
    mn_backend_params bp = {.device = "cpu", .n_threads = 1};
    assert_int_equal(mn_backend_cpu_new(&bp, &be, &eb), MN_OK);
    if (mn_model_load(path, be, NULL, &m, &eb) != MN_OK) fail_msg("cannot load %s: %s (run tools/setup.sh)", path, eb.msg);
    mn_engine_params ep = {.block_size = 16, .n_blocks = 512};
    mn_engine *e;
    if (mn_engine_new(m, &ep, &e, &eb) != MN_OK) fail_msg("%s", eb.msg);
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);

    ctx c = {0};
    if (mn_et_start(&loop, e, &c.et, &eb) != MN_OK) fail_msg("%s", eb.msg);
    c.ev_done = (mn_et_item){NULL, count, &c.ev_runs};
    c.deferred = (mn_et_item){NULL, count, &c.deferred_runs};
    c.late_job = (mn_et_item){NULL, count, &c.late_runs};
    c.before_stop = (mn_et_item){NULL, count, &c.before_runs};
    mn_et_item start = {NULL, start_job, &c};
    mn_et_post_job(c.et, &start);
    mn_et_post_job(c.et, &c.before_stop);
    mn_et_stop(c.et);   /* runs the queued jobs first; the 4000-token generation cannot be over */
    assert_true(c.started);
    assert_int_equal(c.before_runs, 1);
    assert_int_equal(c.done_calls, 0);

    mn_et_post_job(c.et, &c.late_job);   /* no thread to run it: dropped, not queued */
    mn_et_stats st;
    mn_et_stats_get(c.et, &st);
    assert_int_equal(st.jobs_queued, 0);
    uv_run(&loop, UV_RUN_DEFAULT);   /* the async handle's close callback */

    mn_engine_free(e);   /* ends the generation: on_done posts and defers into the stopped et */
    assert_int_equal(c.done_calls, 1);
    mn_et_stats_get(c.et, &st);
    assert_int_equal(st.jobs_queued, 0);
    assert_int_equal(uv_run(&loop, UV_RUN_NOWAIT), 0);   /* nothing left to run or wake */
    assert_int_equal(c.ev_runs, 0);
    assert_int_equal(c.deferred_runs, 0);
    assert_int_equal(c.late_runs, 0);
    mn_et_free(c.et);
    assert_int_equal(uv_loop_close(&loop), 0);
    mn_model_free(m);
    mn_backend_free(be);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stop_then_free_engine),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
