/* tests/unit/test_session_async.c — the non-blocking engine API a server drives.
 *
 * The reference is always the blocking API on a separate engine: sessions submitted and
 * generated concurrently (continuous batching) must give the same greedy tokens as the
 * same sessions run alone; callbacks fire exactly once with the right outcome. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
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

static mn_engine *engine(int32_t n_blocks, int32_t max_batch) {
    mn_engine *e;
    mn_errbuf eb;
    mn_engine_params p = {.block_size = 16, .n_blocks = n_blocks, .max_batch_tokens = max_batch};
    if (mn_engine_new(model, &p, &e, &eb) != MN_OK) fail_msg("%s", eb.msg);
    return e;
}

static mn_gen_params greedy(int32_t n) {
    mn_gen_params g = {.sampling = mn_sampling_defaults(), .max_tokens = n};
    g.sampling.temperature = 0;
    return g;
}

/* What one stream saw. */
typedef struct stream {
    int32_t tokens[256];
    int32_t n_tokens;
    int32_t n_done;
    mn_gen_result res;
    mn_err err;
    int32_t step_of_token[256];
    int32_t *step;          /* the driver's step counter */
    int32_t stop_after;     /* token callback returns false after this many (0: never) */
} stream;

static bool on_token(void *ud, int32_t token, const char *text, size_t len, const mn_sample_info *info) {
    (void)text, (void)len, (void)info;
    stream *st = ud;
    assert_true(st->n_tokens < 256);
    st->step_of_token[st->n_tokens] = st->step ? *st->step : 0;
    st->tokens[st->n_tokens++] = token;
    return st->stop_after == 0 || st->n_tokens < st->stop_after;
}

static void on_done(void *ud, const mn_gen_result *res, mn_err err, const char *msg) {
    (void)msg;
    stream *st = ud;
    st->n_done++;
    st->res = *res;
    st->err = err;
}

typedef struct computed {
    int32_t n_calls;
    mn_err err;
    char msg[256];
} computed;

static void on_computed(void *ud, mn_session *s, mn_err err, const char *msg) {
    (void)s;
    computed *c = ud;
    c->n_calls++;
    c->err = err;
    snprintf(c->msg, sizeof c->msg, "%s", msg ? msg : "");
}

static int32_t run_steps(mn_engine *e, int32_t *step) {
    mn_errbuf eb;
    int32_t n = 0;
    while (mn_engine_has_work(e)) {
        bool did;
        if (mn_engine_step(e, &did, &eb) != MN_OK) fail_msg("step: %s", eb.msg);
        assert_true(did);
        n++;
        if (step) (*step)++;
        assert_true(n < 10000);
    }
    return n;
}

static const char *prompts[4] = {
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):",
    "List three colours:",
};

/* Greedy tokens of prompt p (then text `then`, if not NULL) generated alone with the
 * blocking API on a fresh engine. */
static void alone_then(const char *p, const char *then, int32_t n, stream *out) {
    mn_engine *e = engine(256, 256);
    mn_errbuf eb;
    mn_session *s;
    memset(out, 0, sizeof *out);
    if (mn_session_create(e, NULL, &s, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_append_text(e, s, MN_ROLE_NONE, p, strlen(p), &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (then && mn_session_append_text(e, s, MN_ROLE_NONE, then, strlen(then), &eb) != MN_OK) fail_msg("%s", eb.msg);
    mn_gen_params g = greedy(n);
    if (mn_session_generate(e, s, &g, on_token, out, &out->res, &eb) != MN_OK) fail_msg("%s", eb.msg);
    mn_engine_free(e);
}

static void alone(const char *p, int32_t n, stream *out) { alone_then(p, NULL, n, out); }

static void test_concurrent_equals_alone(void **state) {
    (void)state;
    enum { N = 16 };
    stream ref[4], got[4];
    for (int i = 0; i < 4; i++) alone(prompts[i], N, &ref[i]);
    mn_engine *e = engine(256, 256);
    mn_errbuf eb;
    mn_session *s[4];
    computed c[4] = {0};
    int32_t step = 0;
    for (int i = 0; i < 4; i++) {
        memset(&got[i], 0, sizeof got[i]);
        got[i].step = &step;
        if (mn_session_create(e, NULL, &s[i], &eb) != MN_OK) fail_msg("%s", eb.msg);
        if (mn_session_submit_text(e, s[i], MN_ROLE_NONE, prompts[i], strlen(prompts[i]), &eb) != MN_OK)
            fail_msg("%s", eb.msg);
        assert_true(mn_session_busy(s[i]));
        mn_session_on_computed(e, s[i], on_computed, &c[i]);
        assert_int_equal(c[i].n_calls, 0); /* pending: not yet */
        mn_gen_params g = greedy(N);
        if (mn_session_generate_start(e, s[i], &g, on_token, on_done, &got[i], &eb) != MN_OK) fail_msg("%s", eb.msg);
    }
    int32_t steps = run_steps(e, NULL);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(c[i].n_calls, 1);
        assert_int_equal(c[i].err, MN_OK);
        assert_int_equal(got[i].n_done, 1);
        assert_int_equal(got[i].err, MN_OK);
        assert_int_equal(got[i].res.finish, ref[i].res.finish);
        assert_int_equal(got[i].n_tokens, ref[i].n_tokens);
        assert_memory_equal(got[i].tokens, ref[i].tokens, (size_t)ref[i].n_tokens * sizeof(int32_t));
        assert_false(mn_session_busy(s[i]));
        /* the reply stays in the session */
        int32_t n;
        const int32_t *t = mn_session_tokens(s[i], NULL, &n);
        assert_memory_equal(t + n - got[i].n_tokens, got[i].tokens, (size_t)got[i].n_tokens * sizeof(int32_t));
    }
    /* all four shared steps: about N+1, far fewer than 4 * N */
    if (steps > N + 3) fail_msg("%d steps for 4 concurrent streams of %d tokens: not batched", steps, N);
    /* a callback registered on an idle session fires at once */
    computed now = {0};
    mn_session_on_computed(e, s[0], on_computed, &now);
    assert_int_equal(now.n_calls, 1);
    mn_engine_free(e);
}

/* A long prefill arriving while another session decodes is chunked: the decoding session
 * gets a token in every step. */
static void test_prefill_does_not_starve_decode(void **state) {
    (void)state;
    mn_engine *e = engine(256, 64);
    mn_errbuf eb;
    mn_session *a, *b;
    stream sa = {0};
    int32_t step = 0;
    sa.step = &step;
    if (mn_session_create(e, NULL, &a, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_append_text(e, a, MN_ROLE_NONE, prompts[0], strlen(prompts[0]), &eb) != MN_OK) fail_msg("%s", eb.msg);
    mn_gen_params g = greedy(12);
    if (mn_session_generate_start(e, a, &g, on_token, on_done, &sa, &eb) != MN_OK) fail_msg("%s", eb.msg);
    int32_t long_prompt[600];
    for (int i = 0; i < 600; i++) long_prompt[i] = 100 + (i * 37) % 5000;
    if (mn_session_create(e, NULL, &b, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_submit_tokens(e, b, long_prompt, 600, MN_ROLE_NONE, &eb) != MN_OK) fail_msg("%s", eb.msg);
    computed cb = {0};
    mn_session_on_computed(e, b, on_computed, &cb);
    run_steps(e, &step);
    assert_int_equal(sa.n_done, 1);
    assert_int_equal(sa.n_tokens, 12);
    for (int i = 1; i < sa.n_tokens; i++)
        if (sa.step_of_token[i] != sa.step_of_token[i - 1] + 1)
            fail_msg("token %d came %d steps after token %d: decode starved by a prefill", i,
                     sa.step_of_token[i] - sa.step_of_token[i - 1], i - 1);
    assert_int_equal(cb.n_calls, 1);
    assert_int_equal(cb.err, MN_OK);
    mn_session_info info;
    mn_session_info_get(e, b, &info);
    assert_int_equal(info.n_computed, 600);
    mn_engine_free(e);
}

static void test_cancel_and_delete(void **state) {
    (void)state;
    mn_engine *e = engine(256, 256);
    mn_errbuf eb;
    mn_session *s;
    stream st = {0};
    if (mn_session_create(e, NULL, &s, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_append_text(e, s, MN_ROLE_NONE, prompts[1], strlen(prompts[1]), &eb) != MN_OK) fail_msg("%s", eb.msg);
    int32_t n0;
    mn_session_tokens(s, NULL, &n0);
    mn_gen_params g = greedy(50);
    if (mn_session_generate_start(e, s, &g, on_token, on_done, &st, &eb) != MN_OK) fail_msg("%s", eb.msg);
    /* a second generation on the same session is refused */
    stream other = {0};
    assert_int_equal(mn_session_generate_start(e, s, &g, on_token, on_done, &other, &eb), MN_EBUSY);
    assert_int_equal(mn_session_submit_text(e, s, MN_ROLE_NONE, "x", 1, &eb), MN_EBUSY);
    for (int i = 0; i < 4; i++) {
        bool did;
        if (mn_engine_step(e, &did, &eb) != MN_OK) fail_msg("%s", eb.msg);
    }
    assert_int_equal(st.n_done, 0);
    mn_session_generate_cancel(e, s);
    assert_int_equal(st.n_done, 1);
    assert_int_equal(st.res.finish, MN_FINISH_CANCELLED);
    assert_int_equal(st.res.n_generated, st.n_tokens);
    mn_session_generate_cancel(e, s); /* no-op now */
    assert_int_equal(st.n_done, 1);
    run_steps(e, NULL); /* the last sampled token's KV */
    int32_t n1;
    mn_session_tokens(s, NULL, &n1);
    assert_int_equal(n1, n0 + st.n_tokens); /* delivered tokens stay */

    /* the token callback stops the stream */
    stream st2 = {.stop_after = 3};
    if (mn_session_generate_start(e, s, &g, on_token, on_done, &st2, &eb) != MN_OK) fail_msg("%s", eb.msg);
    run_steps(e, NULL);
    assert_int_equal(st2.n_done, 1);
    assert_int_equal(st2.res.finish, MN_FINISH_CANCELLED);
    assert_int_equal(st2.n_tokens, 3);

    /* deleting a generating session ends its stream and its computed callback */
    stream st3 = {0};
    computed c = {0};
    if (mn_session_generate_start(e, s, &g, on_token, on_done, &st3, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_submit_tokens(e, s, (int32_t[]){1}, 1, MN_ROLE_NONE, &eb) != MN_EBUSY) fail_msg("submit while generating");
    mn_session_on_computed(e, s, on_computed, &c);
    bool did;
    if (mn_engine_step(e, &did, &eb) != MN_OK) fail_msg("%s", eb.msg);
    mn_session_delete(e, s);
    assert_int_equal(st3.n_done, 1);
    assert_int_equal(st3.res.finish, MN_FINISH_CANCELLED);
    assert_true(c.n_calls <= 1);
    assert_false(mn_engine_has_work(e));
    mn_engine_free(e);
}

/* A step that cannot run (KV pool too small) fails only the sessions in it: their pending
 * tokens are dropped, their callbacks report the error, and the engine goes on. */
static void test_step_failure(void **state) {
    (void)state;
    mn_engine *e = engine(4, 256); /* 64 positions */
    mn_errbuf eb;
    mn_session *big, *small;
    if (mn_session_create(e, NULL, &big, &eb) != MN_OK) fail_msg("%s", eb.msg);
    int32_t toks[100];
    for (int i = 0; i < 100; i++) toks[i] = 200 + i;
    if (mn_session_submit_tokens(e, big, toks, 100, MN_ROLE_NONE, &eb) != MN_OK) fail_msg("%s", eb.msg);
    computed c = {0};
    mn_session_on_computed(e, big, on_computed, &c);
    bool did;
    mn_err err = mn_engine_step(e, &did, &eb);
    assert_int_not_equal(err, MN_OK);
    assert_int_equal(c.n_calls, 1);
    assert_int_equal(c.err, err);
    assert_true(strlen(c.msg) > 0);
    assert_false(mn_session_busy(big));
    int32_t n;
    mn_session_tokens(big, NULL, &n);
    assert_int_equal(n, 0);
    /* the engine still serves */
    if (mn_session_create(e, NULL, &small, &eb) != MN_OK) fail_msg("%s", eb.msg);
    stream st = {0};
    if (mn_session_submit_text(e, small, MN_ROLE_NONE, prompts[0], strlen(prompts[0]), &eb) != MN_OK) fail_msg("%s", eb.msg);
    mn_gen_params g = greedy(5);
    if (mn_session_generate_start(e, small, &g, on_token, on_done, &st, &eb) != MN_OK) fail_msg("%s", eb.msg);
    run_steps(e, NULL);
    assert_int_equal(st.n_done, 1);
    assert_int_equal(st.err, MN_OK);
    stream ref;
    alone(prompts[0], 5, &ref);
    assert_memory_equal(st.tokens, ref.tokens, 5 * sizeof(int32_t));
    mn_engine_free(e);
}

/* ---- promotion in the background (a lift) ---------------------------------------------- */

/* Steps until nothing is left; a step may find nothing to run while a lift is on the way. */
static void run_steps_lifting(mn_engine *e) {
    mn_errbuf eb;
    for (int32_t n = 0; mn_engine_has_work(e); n++) {
        bool did;
        if (mn_engine_step(e, &did, &eb) != MN_OK) fail_msg("step: %s", eb.msg);
        assert_true(n < 100000);
    }
}

static const char *const more = " and then, after a long pause, it";

static mn_session *demoted(mn_engine *e, const char *p, int tier) {
    mn_errbuf eb;
    mn_session *s;
    if (mn_session_create(e, NULL, &s, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_append_text(e, s, MN_ROLE_NONE, p, strlen(p), &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_demote(e, s, tier, &eb) != MN_OK) fail_msg("%s", eb.msg);
    return s;
}

static const char *tier_of(mn_engine *e, mn_session *s) {
    mn_session_info info;
    mn_session_info_get(e, s, &info);
    return info.tier;
}

/* Tokens submitted to sessions in T2 and T3 return at once (the read and decompression
 * run on the tier worker, the session stays where it is until a step installs it), the
 * resident session keeps decoding meanwhile, and every stream equals the same
 * conversation run on an engine where nothing ever moved. */
static void test_lift_in_background(void **state) {
    (void)state;
    char dir[] = "/tmp/mneme-lift-XXXXXX";
    assert_non_null(mkdtemp(dir));
    mn_engine *e;
    mn_errbuf eb;
    mn_engine_params p = {.block_size = 16, .n_blocks = 256, .max_batch_tokens = 256, .persist_dir = dir};
    if (mn_engine_new(model, &p, &e, &eb) != MN_OK) fail_msg("%s", eb.msg);
    mn_session *a = demoted(e, prompts[1], 3), *b = demoted(e, prompts[2], 2), *c;
    assert_string_equal(tier_of(e, a), "T3");
    assert_string_equal(tier_of(e, b), "T2");
    if (mn_session_create(e, NULL, &c, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_submit_text(e, c, MN_ROLE_NONE, prompts[0], strlen(prompts[0]), &eb) != MN_OK) fail_msg("%s", eb.msg);
    stream sa = {0}, sb = {0}, sc = {0};
    mn_gen_params g = greedy(8);
    if (mn_session_generate_start(e, c, &g, on_token, on_done, &sc, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_submit_text(e, a, MN_ROLE_NONE, more, strlen(more), &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_submit_text(e, b, MN_ROLE_NONE, more, strlen(more), &eb) != MN_OK) fail_msg("%s", eb.msg);
    /* submitted, not promoted: only a step installs the lift */
    assert_string_equal(tier_of(e, a), "T3");
    assert_string_equal(tier_of(e, b), "T2");
    if (mn_session_generate_start(e, a, &g, on_token, on_done, &sa, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_generate_start(e, b, &g, on_token, on_done, &sb, &eb) != MN_OK) fail_msg("%s", eb.msg);
    assert_string_equal(tier_of(e, a), "T3");
    run_steps_lifting(e);
    stream ra, rb, rc;
    alone_then(prompts[1], more, 8, &ra);
    alone_then(prompts[2], more, 8, &rb);
    alone(prompts[0], 8, &rc);
    stream *got[3] = {&sa, &sb, &sc}, *want[3] = {&ra, &rb, &rc};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(got[i]->n_done, 1);
        assert_int_equal(got[i]->err, MN_OK);
        assert_int_equal(got[i]->n_tokens, want[i]->n_tokens);
        assert_memory_equal(got[i]->tokens, want[i]->tokens, (size_t)want[i]->n_tokens * sizeof(int32_t));
    }
    assert_string_equal(tier_of(e, a), "T0");
    assert_string_equal(tier_of(e, b), "T0");
    /* the T3 file went away with the promotion */
    char path[256];
    snprintf(path, sizeof path, "%s/%s.mns", dir, mn_session_id(a));
    assert_int_equal(access(path, F_OK), -1);

    /* deleted while its lift is on the way: nothing leaks, nothing is installed */
    mn_session *d = demoted(e, prompts[3], 3), *d2 = demoted(e, prompts[3], 2);
    if (mn_session_submit_text(e, d, MN_ROLE_NONE, more, strlen(more), &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_submit_text(e, d2, MN_ROLE_NONE, more, strlen(more), &eb) != MN_OK) fail_msg("%s", eb.msg);
    snprintf(path, sizeof path, "%s/%s.mns", dir, mn_session_id(d));
    mn_session_delete(e, d);
    mn_session_delete(e, d2);
    mn_engine_tier_wait(e);
    assert_int_equal(access(path, F_OK), -1);
    assert_false(mn_engine_has_work(e));

    /* a damaged file: the lift fails, the session's generation reports why, the others
     * are untouched and the engine goes on */
    mn_session *bad = demoted(e, prompts[3], 3);
    snprintf(path, sizeof path, "%s/%s.mns", dir, mn_session_id(bad));
    FILE *f = fopen(path, "r+b");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, len / 2, SEEK_SET);
    int ch = fgetc(f);
    fseek(f, len / 2, SEEK_SET);
    fputc(ch ^ 0x5a, f);
    fclose(f);
    stream sbad = {0}, sc2 = {0};
    if (mn_session_submit_text(e, bad, MN_ROLE_NONE, more, strlen(more), &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_generate_start(e, bad, &g, on_token, on_done, &sbad, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_submit_text(e, c, MN_ROLE_NONE, more, strlen(more), &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_generate_start(e, c, &g, on_token, on_done, &sc2, &eb) != MN_OK) fail_msg("%s", eb.msg);
    run_steps_lifting(e);
    assert_int_equal(sbad.n_done, 1);
    assert_int_not_equal(sbad.err, MN_OK);
    assert_int_equal(sbad.n_tokens, 0);
    assert_int_equal(sc2.n_done, 1);
    assert_int_equal(sc2.err, MN_OK);
    assert_int_equal(sc2.n_tokens, 8);
    /* the blocking API reports the same failure */
    int32_t one = 200;
    assert_int_not_equal(mn_session_append_tokens(e, bad, &one, 1, MN_ROLE_NONE, &eb), MN_OK);
    printf("damaged T3 file, lift refused: %s\n", eb.msg);

    /* another (shorter) session's file in its place, checksums all good: refused by the
     * lift (its image would be read past its end as this session's), not installed */
    mn_session *big = demoted(e, prompts[1], 3), *small;
    char bigp[256];
    snprintf(bigp, sizeof bigp, "%s/%s.mns", dir, mn_session_id(big));
    if (mn_session_create(e, NULL, &small, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_append_text(e, small, MN_ROLE_NONE, "Hi.", 3, &eb) != MN_OK) fail_msg("%s", eb.msg);
    assert_int_equal(mn_session_save(e, small, bigp, &eb), MN_OK); /* over big's T3 file */
    mn_session_delete(e, small);
    stream sbig = {0};
    if (mn_session_submit_text(e, big, MN_ROLE_NONE, more, strlen(more), &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_generate_start(e, big, &g, on_token, on_done, &sbig, &eb) != MN_OK) fail_msg("%s", eb.msg);
    run_steps_lifting(e);
    assert_int_equal(sbig.n_done, 1);
    assert_int_equal(sbig.err, MN_EMISMATCH);
    assert_int_equal(sbig.n_tokens, 0);
    assert_string_equal(tier_of(e, big), "T3");
    mn_engine_free(e);
    DIR *dd = opendir(dir);
    struct dirent *de;
    while (dd && (de = readdir(dd))) {
        if (de->d_name[0] == '.') continue;
        char fp[512];
        snprintf(fp, sizeof fp, "%s/%s", dir, de->d_name);
        unlink(fp);
    }
    if (dd) closedir(dd);
    rmdir(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_concurrent_equals_alone),
        cmocka_unit_test(test_prefill_does_not_starve_decode),
        cmocka_unit_test(test_cancel_and_delete),
        cmocka_unit_test(test_step_failure),
        cmocka_unit_test(test_lift_in_background),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
