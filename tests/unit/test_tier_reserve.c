/* tests/unit/test_tier_reserve.c — the KV reserve on the real SmolLM2 model.
 *
 * After a step the engine keeps kv_reserve blocks reclaimable by demoting idle sessions to
 * T1 in the background (copies only enqueued), so the next step that needs blocks finds
 * them without a demotion whose copy it waits for. The counters of mn_engine_stats tell
 * the two kinds apart. Copies are made late (mn_backend_cpu_slow_copies) wherever a
 * missing wait would show: a block reused or an image read before its copy is done gives
 * logits that differ from a session that never moved. The reference is a session in a
 * separate engine that got the same tokens in one append. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/session.h"
#include "tests/unit/test_model.h"

static mn_backend *be;
static mn_model *model;

static int setup(void **state) {
    (void)state;
    return mn_test_load_default_model(2, &be, &model);
}

static int teardown(void **state) {
    (void)state;
    mn_model_free(model);
    mn_backend_free(be);
    return 0;
}

static mn_engine *engine(int32_t n_blocks, int32_t max_batch, int32_t reserve) {
    mn_engine *e;
    mn_errbuf eb;
    mn_engine_params p = {.block_size = 16, .n_blocks = n_blocks, .max_batch_tokens = max_batch, .kv_reserve = reserve};
    if (mn_engine_new(model, &p, &e, &eb) != MN_OK) fail_msg("%s", eb.msg);
    return e;
}

/* n token ids of their own for session `seed` (no prefix shared with another seed). */
static void fill_tokens(int32_t *t, int n, int seed) {
    for (int i = 0; i < n; i++) t[i] = 300 + (i * 37 + seed * 1009) % 20000;
}

static void append_n(mn_engine *e, mn_session *s, int n, int seed) {
    int32_t t[256];
    mn_errbuf eb;
    assert_true(n <= 256);
    fill_tokens(t, n, seed);
    if (mn_session_append_tokens(e, s, t, n, MN_ROLE_NONE, &eb) != MN_OK) fail_msg("append: %s", eb.msg);
}

static mn_session *new_session(mn_engine *e, int n, int seed) {
    mn_session *s;
    mn_errbuf eb;
    if (mn_session_create(e, NULL, &s, &eb) != MN_OK) fail_msg("%s", eb.msg);
    append_n(e, s, n, seed);
    return s;
}

static const char *tier(mn_engine *e, mn_session *s) {
    mn_session_info info;
    mn_session_info_get(e, s, &info);
    return info.tier;
}

/* s's logits equal those of a fresh session in ref holding the same tokens. */
static void assert_logits_equal(mn_engine *ref, const mn_session *s, const char *what) {
    const float *l = mn_session_logits(s);
    if (!l) fail_msg("%s: no logits", what);
    int32_t n;
    const int32_t *t = mn_session_tokens(s, NULL, &n);
    mn_session *f;
    mn_errbuf eb;
    if (mn_session_create(ref, NULL, &f, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_append_tokens(ref, f, t, n, MN_ROLE_NONE, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (memcmp(l, mn_session_logits(f), (size_t)model->cfg.n_vocab * sizeof(float)) != 0)
        fail_msg("%s: logits differ from a session that never moved", what);
    mn_session_delete(ref, f);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Step an idle engine until no block is draining (its copies out are done); 10 s at most. */
static void wait_drained(mn_engine *e) {
    mn_engine_stats st;
    mn_errbuf eb;
    double t0 = now_s();
    for (;;) {
        bool did;
        assert_int_equal(mn_engine_step(e, &did, &eb), MN_OK);
        mn_engine_stats_get(e, &st);
        if (st.blocks_draining == 0) return;
        if (now_s() - t0 > 10) fail_msg("%d blocks still draining after 10 s", st.blocks_draining);
        usleep(2000);
    }
}

/* A pool of 24 blocks and a reserve of 6. Six sessions of 40 tokens (3 blocks each, two of
 * them full and so also in the prefix cache) leave 6 free: no pressure yet, no reserve
 * demotion. A session of 100 tokens (8 blocks wanted by its first step) makes the pool run
 * short: A and B are demoted the waited way (nothing else is reclaimable). Its second step
 * leaves 1 block free and 4 held by the cache alone; the refill at its end demotes C, the
 * least recently used idle session, in the background: C is T1 at once while its 3 blocks
 * are still held by the copy, and they come back once it is done. The next sessions that
 * need blocks get them without a waited demotion, also while a copy is still in flight;
 * every session that moved equals one that never did. */
static void test_reserve_refills_in_background(void **state) {
    (void)state;
    mn_engine *e = engine(24, 64, 6), *ref = engine(128, 64, MN_KV_RESERVE_OFF);
    mn_engine_stats st, st0;
    mn_session *s[6];
    for (int i = 0; i < 6; i++) s[i] = new_session(e, 40, i);
    mn_engine_stats_get(e, &st);
    assert_int_equal(st.blocks_reserve, 6);
    assert_int_equal(st.blocks_free, 6);
    assert_int_equal(st.demotions_waited + st.demotions_background, 0); /* never short: the reserve waits */

    mn_backend_cpu_slow_copies(be, 3000);
    mn_session *g = new_session(e, 100, 10);
    mn_engine_stats_get(e, &st);
    assert_int_equal(st.demotions_waited, 2);      /* A and B: the pool ran short, nothing reclaimable */
    assert_string_equal(tier(e, s[0]), "T1");
    assert_string_equal(tier(e, s[1]), "T1");
    assert_int_equal(st.reserve_demotions, 1);     /* C, to refill the reserve */
    assert_int_equal(st.demotions_background, 1);
    assert_string_equal(tier(e, s[2]), "T1");
    assert_string_equal(tier(e, s[3]), "T0");
    assert_string_equal(tier(e, g), "T0");         /* in the batch: never taken for the reserve */
    assert_int_equal(st.blocks_draining, 3);       /* held: the copy out is still queued */
    assert_int_equal(st.blocks_free, 1);
    wait_drained(e);
    mn_engine_stats_get(e, &st0);
    assert_int_equal(st0.blocks_free, 2);          /* C's partial block; its 2 full ones the cache holds */
    assert_int_equal(st0.reserve_demotions, 1);    /* 2 free + 6 cache-only: the reserve is there */

    /* H (3 blocks + a copy-on-write) is served by the cache-only blocks: no waited demotion */
    mn_session *h = new_session(e, 40, 11);
    mn_engine_stats_get(e, &st);
    assert_int_equal(st.demotions_waited, 2);
    assert_int_equal(st.reserve_demotions, 2);     /* 5 reclaimable after H: D goes, in the background */
    assert_string_equal(tier(e, s[3]), "T1");
    assert_true(st.blocks_draining > 0);
    /* I wants 6 blocks while D's copy is still in flight: make_room waits for that copy
     * (started a step earlier) instead of demoting anything */
    mn_session *in = new_session(e, 80, 12);
    mn_engine_stats_get(e, &st);
    assert_int_equal(st.demotions_waited, 2);
    assert_int_equal(st.drain_waits, st0.drain_waits + 1);

    /* back up, with the copies still late: A (waited), C and D (reserve) */
    append_n(e, s[0], 5, 20);
    append_n(e, s[2], 5, 22);
    append_n(e, s[3], 5, 23);
    mn_backend_cpu_slow_copies(be, 0);
    assert_logits_equal(ref, s[0], "restored after a waited demotion");
    assert_logits_equal(ref, s[2], "restored after a reserve demotion");
    assert_logits_equal(ref, s[3], "restored after a reserve demotion with a drain wait");
    assert_logits_equal(ref, g, "the session that ran the pool short");
    assert_logits_equal(ref, in, "a session that got a drained block");
    mn_session_delete(e, h);
    mn_session_delete(e, in);
    mn_session_delete(e, g);
    for (int i = 0; i < 6; i++) mn_session_delete(e, s[i]);
    wait_drained(e);
    mn_engine_stats_get(e, &st);
    assert_int_equal(st.blocks_free + st.prefix_entries, 24); /* every block came back (or is cached) */
    assert_int_equal(st.tier_bytes[1], 0);
    mn_engine_free(e);
    mn_engine_free(ref);
}

/* The reserve takes only sessions whose demotion frees something and that were in neither
 * this step's nor the previous step's batch. Pool of 16, reserve 6: x's 4 full blocks are
 * left to the cache alone, a (2 blocks) and its fork share every block, b has 3 of its own.
 * c (7 blocks) runs the pool short: make_room drops x's cached blocks, no demotion. After
 * c's step 4 blocks are reclaimable, but a and the fork are older yet would free nothing,
 * b was in the previous batch and c in this one: nothing goes. At the next (idle) step b
 * is out of the last two batches and goes, in the background; c still stays. */
static void test_reserve_takes_only_what_frees(void **state) {
    (void)state;
    mn_engine *e = engine(16, 128, 6), *ref = engine(128, 64, MN_KV_RESERVE_OFF);
    mn_errbuf eb;
    mn_session *x = new_session(e, 64, 1);
    mn_session_delete(e, x);
    mn_session *a = new_session(e, 32, 2), *f, *b, *c;
    assert_int_equal(mn_session_fork(e, a, &f, &eb), MN_OK);
    b = new_session(e, 40, 3);
    c = new_session(e, 100, 4);
    mn_engine_stats st;
    mn_engine_stats_get(e, &st);
    assert_int_equal(st.demotions_waited, 0);
    assert_int_equal(st.reserve_demotions, 0);
    assert_int_equal(st.blocks_free, 4);
    assert_string_equal(tier(e, b), "T0");
    bool did;
    assert_int_equal(mn_engine_step(e, &did, &eb), MN_OK);
    assert_false(did);
    mn_engine_stats_get(e, &st);
    assert_int_equal(st.demotions_waited, 0);
    assert_int_equal(st.reserve_demotions, 1);
    assert_string_equal(tier(e, b), "T1");
    assert_string_equal(tier(e, a), "T0");
    assert_string_equal(tier(e, f), "T0");
    assert_string_equal(tier(e, c), "T0");
    append_n(e, b, 4, 5);
    assert_logits_equal(ref, b, "restored after a reserve demotion");
    mn_session_delete(e, a);
    mn_session_delete(e, f);
    mn_session_delete(e, b);
    mn_session_delete(e, c);
    wait_drained(e);
    mn_engine_stats_get(e, &st);
    assert_int_equal(st.blocks_free + st.prefix_entries, 16);
    mn_engine_free(e);
    mn_engine_free(ref);
}

/* Sessions taking turns in a pool with room for about 4: with the reserve most turns find
 * blocks (free, cache-only or draining) and only a few wait for a demotion; without it
 * nearly every turn after the pool first fills waits for one. The logits are the same
 * either way. */
static void run_turns(int32_t reserve, int n, int rounds, mn_engine_stats *out, double *seconds, mn_engine *ref) {
    mn_engine *e = engine(16, 64, reserve);
    mn_session **ss = calloc((size_t)n, sizeof *ss);
    mn_errbuf eb;
    double t0 = now_s();
    for (int i = 0; i < n; i++) ss[i] = new_session(e, 45, 100 + i);
    for (int r = 0; r < rounds; r++)
        for (int i = 0; i < n; i++) {
            append_n(e, ss[i], 5, 200 + 10 * r + i);
            mn_gen_params g = {0};
            g.sampling = mn_sampling_defaults();
            g.sampling.temperature = 0;
            g.max_tokens = 2;
            if (mn_session_generate(e, ss[i], &g, NULL, NULL, NULL, &eb) != MN_OK) fail_msg("session %d: %s", i, eb.msg);
        }
    *seconds = now_s() - t0;
    mn_engine_stats_get(e, out);
    for (int i = 0; i < n; i += 5) {
        append_n(e, ss[i], 3, 300 + i);
        assert_logits_equal(ref, ss[i], "a session that took turns");
    }
    for (int i = 0; i < n; i++) mn_session_delete(e, ss[i]);
    free(ss);
    mn_engine_free(e);
}

static void test_reserve_turns(void **state) {
    (void)state;
    mn_engine *ref = engine(128, 64, MN_KV_RESERVE_OFF);
    mn_engine_stats on, off;
    double t_on, t_off;
    run_turns(0, 12, 2, &on, &t_on, ref);
    run_turns(MN_KV_RESERVE_OFF, 12, 2, &off, &t_off, ref);
    fprintf(stderr, "turns, 12 sessions x 3 in a 16-block pool: reserve %d: waited %lld background %lld drain waits %lld "
            "(%.2f s); off: waited %lld background %lld (%.2f s)\n", on.blocks_reserve, (long long)on.demotions_waited,
            (long long)on.demotions_background, (long long)on.drain_waits, t_on, (long long)off.demotions_waited,
            (long long)off.demotions_background, t_off);
    assert_int_equal(off.blocks_reserve, 0);
    assert_int_equal(off.demotions_background, 0);
    assert_true(off.demotions_waited >= 12 * 2);            /* every turn waited for one */
    assert_true(on.reserve_demotions > 0);
    assert_true(on.demotions_waited * 4 <= off.demotions_waited);
    mn_engine_free(ref);
}

int main(void) {
    const char *allow = getenv("MNEME_ALLOW_NO_MODEL");
    FILE *f = fopen(mn_test_model_path(), "rb");
    if (!f && allow && *allow == '1') return 0;
    if (f) fclose(f);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reserve_refills_in_background),
        cmocka_unit_test(test_reserve_takes_only_what_frees),
        cmocka_unit_test(test_reserve_turns),
    };
    if (getenv("MNEME_TEST_FILTER")) cmocka_set_test_filter(getenv("MNEME_TEST_FILTER"));
    return cmocka_run_group_tests(tests, setup, teardown);
}
