/* tests/unit/test_session_sample.c — sampling on the backend inside the engine step
 * (mn_engine_params.sample_on) against sampling on the host, on the real SmolLM2 model
 * and the CPU backend.
 *
 * The comparison itself is tests/unit/gen_compare.h (the GPU check runs the same on the
 * CUDA backend): same tokens and logprobs, the device path really taken (engine stats:
 * rows sampled on the backend, logits bytes copied), host-only parameters falling back.
 * Here also: the blocking mn_session_generate, and what the forward refuses. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/forward.h"
#include "engine/kv.h"
#include "engine/session.h"
#include "tests/unit/gen_compare.h"
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

/* Eight sessions in the same batches, mixed parameters (gen_compare.h's standard mix),
 * sampled on the host and on the backend. */
static void test_batch_backend_vs_host(void **state) {
    (void)state;
    gc_case cases[GC_MAX_CASES];
    mn_logit_bias bias[1];
    int32_t n = gc_standard_cases(cases, bias, model->cfg.n_vocab);
    gc_result *h = NULL, *b = NULL;
    char why[512];
    if (!gc_run(model, MN_SAMPLE_ON_HOST, cases, n, 20, &h, why, sizeof why)) fail_msg("host run: %s", why);
    if (!gc_run(model, MN_SAMPLE_ON_BACKEND, cases, n, 20, &b, why, sizeof why)) fail_msg("backend run: %s", why);
    if (!gc_compare(h, b, cases, model->cfg.n_vocab, why, sizeof why)) fail_msg("%s", why);
    /* the default (auto) samples on the backend too */
    gc_result *a = NULL;
    if (!gc_run(model, MN_SAMPLE_ON_AUTO, cases, n, 20, &a, why, sizeof why)) fail_msg("auto run: %s", why);
    if (!gc_compare(h, a, cases, model->cfg.n_vocab, why, sizeof why)) fail_msg("auto: %s", why);
    printf("tokens sampled on the backend %lld, on the host %lld; logits to the host %lld bytes (host mode %lld)\n",
           (long long)b->st.sampled_backend, (long long)b->st.sampled_host, (long long)b->st.logits_bytes,
           (long long)h->st.logits_bytes);
    gc_free(h);
    gc_free(b);
    gc_free(a);
}

/* A planted difference must be caught: a case sampled with another seed in the backend
 * run (so gen_compare cannot pass by comparing a run with itself). */
static void test_compare_catches_a_difference(void **state) {
    (void)state;
    gc_case cases[GC_MAX_CASES], other[GC_MAX_CASES];
    mn_logit_bias bias[1];
    gc_standard_cases(cases, bias, model->cfg.n_vocab);
    memcpy(other, cases, sizeof cases);
    other[1].sp.seed = 43;
    gc_result *h = NULL, *b = NULL;
    char why[512];
    if (!gc_run(model, MN_SAMPLE_ON_HOST, cases, 2, 12, &h, why, sizeof why)) fail_msg("host run: %s", why);
    if (!gc_run(model, MN_SAMPLE_ON_BACKEND, other, 2, 12, &b, why, sizeof why)) fail_msg("backend run: %s", why);
    assert_int_equal(gc_compare(h, b, cases, model->cfg.n_vocab, why, sizeof why), 0);
    gc_free(h);
    gc_free(b);
}

static bool collect(void *ud, int32_t token, const char *text, size_t len, const mn_sample_info *info) {
    (void)text, (void)len, (void)info;
    int32_t *t = ud;
    t[1 + t[0]++] = token;
    return true;
}

/* mn_session_generate on a prompt computed before it starts: the first token comes from
 * the host logits already there, every later one from the sample op on the backend. */
static void test_blocking_generate(void **state) {
    (void)state;
    int32_t got[2][1 + 32];
    mn_engine_stats st[2];
    for (int mode = 0; mode < 2; mode++) {
        mn_errbuf eb;
        mn_engine *e;
        mn_engine_params p = {.block_size = 16, .n_blocks = 64, .max_batch_tokens = 64,
                              .sample_on = mode ? MN_SAMPLE_ON_BACKEND : MN_SAMPLE_ON_HOST};
        if (mn_engine_new(model, &p, &e, &eb) != MN_OK) fail_msg("%s", eb.msg);
        mn_session *s;
        const char *text = "The quick brown fox";
        if (mn_session_create(e, NULL, &s, &eb) != MN_OK) fail_msg("%s", eb.msg);
        if (mn_session_append_text(e, s, MN_ROLE_NONE, text, strlen(text), &eb) != MN_OK) fail_msg("%s", eb.msg);
        mn_gen_params g = {.sampling = mn_sampling_defaults(), .max_tokens = 16};
        g.sampling.seed = 1234;
        g.sampling.temperature = 1.1f;
        got[mode][0] = 0;
        mn_gen_result res;
        if (mn_session_generate(e, s, &g, collect, got[mode], &res, &eb) != MN_OK) fail_msg("%s", eb.msg);
        assert_int_equal(res.n_generated, got[mode][0]);
        assert_non_null(mn_session_logits(s)); /* the last token's logits, as before */
        mn_engine_stats_get(e, &st[mode]);
        mn_engine_free(e);
    }
    assert_int_equal(got[0][0], got[1][0]);
    assert_memory_equal(got[0], got[1], (size_t)(1 + got[0][0]) * sizeof(int32_t));
    assert_int_equal(st[0].sampled_backend, 0);
    assert_int_equal(st[1].sampled_host, 1);
    assert_int_equal(st[1].sampled_backend, got[1][0] - 1);
}

static void on_done(void *ud, const mn_gen_result *res, mn_err err, const char *msg) {
    (void)ud, (void)res, (void)err, (void)msg;
}

/* A generation cancelled between steps loses the token the backend had already chosen
 * (as the host path loses the logits' draw): the session keeps no host logits, so the next
 * generation recomputes its last token (gen_begin) and goes on exactly as on the host. */
static void test_cancel_then_generate(void **state) {
    (void)state;
    int32_t got[2][1 + 32], first[2][1 + 32];
    mn_engine_stats st[2];
    for (int mode = 0; mode < 2; mode++) {
        mn_errbuf eb;
        mn_engine *e;
        mn_engine_params p = {.block_size = 16, .n_blocks = 64, .max_batch_tokens = 64,
                              .sample_on = mode ? MN_SAMPLE_ON_BACKEND : MN_SAMPLE_ON_HOST};
        if (mn_engine_new(model, &p, &e, &eb) != MN_OK) fail_msg("%s", eb.msg);
        mn_session *s;
        int32_t prompt[20];
        for (int32_t k = 0; k < 20; k++) prompt[k] = (k * 53 + 9) % model->cfg.n_vocab;
        if (mn_session_create(e, NULL, &s, &eb) != MN_OK) fail_msg("%s", eb.msg);
        if (mn_session_submit_tokens(e, s, prompt, 20, MN_ROLE_NONE, &eb) != MN_OK) fail_msg("%s", eb.msg);
        mn_gen_params g = {.sampling = mn_sampling_defaults(), .max_tokens = 30};
        g.sampling.seed = 77;
        first[mode][0] = 0;
        if (mn_session_generate_start(e, s, &g, collect, on_done, first[mode], &eb) != MN_OK) fail_msg("%s", eb.msg);
        for (int i = 0; i < 4; i++) { /* the prompt, then 3 tokens; a 4th chosen, not yet emitted */
            bool did;
            if (mn_engine_step(e, &did, &eb) != MN_OK) fail_msg("%s", eb.msg);
        }
        if (mode) assert_null(mn_session_logits(s));
        mn_session_generate_cancel(e, s);
        g.sampling.seed = 78;
        g.max_tokens = 8;
        got[mode][0] = 0;
        if (mn_session_generate(e, s, &g, collect, got[mode], NULL, &eb) != MN_OK) fail_msg("%s", eb.msg);
        mn_engine_stats_get(e, &st[mode]);
        mn_engine_free(e);
    }
    assert_int_equal(first[0][0], 3);
    assert_memory_equal(first[0], first[1], 4 * sizeof(int32_t));
    assert_int_equal(got[0][0], got[1][0]);
    assert_memory_equal(got[0], got[1], (size_t)(1 + got[0][0]) * sizeof(int32_t));
    assert_int_equal(st[1].sampled_host, 0); /* also the second generation's first token */
    assert_true(st[1].sampled_backend >= 3 + 1 + got[1][0]);
}

/* The forward refuses bad sample fields, naming them, with nothing computed. */
static void test_forward_refuses(void **state) {
    (void)state;
    const mn_model_config *c = &model->cfg;
    mn_errbuf eb;
    mn_kv_pool *kv;
    mn_forward *f;
    if (mn_kv_pool_new(be, c->n_layer, c->n_kv_head, c->head_dim, 16, 8, &kv, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_forward_new(model, kv, &f, &eb) != MN_OK) fail_msg("%s", eb.msg);
    mn_kv_seq seq = {0}, *seqs[1] = {&seq};
    int32_t tok[2] = {1, 2}, sq[2] = {0, 0}, pos[2] = {0, 1}, rows[1] = {1}, out_tok[2];
    float *logits = malloc((size_t)c->n_vocab * sizeof(float));
    mn_batch b = {.n_tokens = 2, .tokens = tok, .seq = sq, .pos = pos, .n_out = 1, .out_rows = rows};
    mn_sample_params sp[2] = {{.temperature = 0.0f, .top_p = 1.0f}, {.temperature = 0.0f, .top_p = 1.0f}};
    mn_batch_sample s = {.n_sample = 2, .params = sp, .token = out_tok};
    assert_int_equal(mn_forward_run_sample(f, seqs, 1, &b, NULL, &s, logits, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "n_sample"));
    s.n_sample = 1;
    sp[0].n_logprobs = 2; /* logprobs without an array for them */
    assert_int_equal(mn_forward_run_sample(f, seqs, 1, &b, NULL, &s, logits, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "logprob"));
    sp[0].n_logprobs = 0;
    sp[0].u = 1.0;
    assert_int_equal(mn_forward_run_sample(f, seqs, 1, &b, NULL, &s, logits, &eb), MN_ERANGE);
    assert_int_equal(seq.n_tokens, 0); /* nothing computed */
    /* and a good one: greedy on the backend picks the argmax of the logits it keeps */
    sp[0].u = 0.0;
    out_tok[0] = -1;
    if (mn_forward_run_sample(f, seqs, 1, &b, NULL, &s, logits, &eb) != MN_OK) fail_msg("%s", eb.msg);
    mn_kv_seq seq2 = {0}, *seqs2[1] = {&seq2};
    if (mn_forward_run(f, seqs2, 1, &b, logits, &eb) != MN_OK) fail_msg("%s", eb.msg);
    int32_t am = 0;
    for (int32_t v = 1; v < c->n_vocab; v++)
        if (logits[v] > logits[am]) am = v;
    assert_int_equal(out_tok[0], am);
    free(logits);
    mn_kv_seq_release(kv, &seq);
    mn_kv_seq_release(kv, &seq2);
    mn_forward_free(f);
    mn_kv_pool_free(kv);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forward_refuses),
        cmocka_unit_test(test_blocking_generate),
        cmocka_unit_test(test_cancel_then_generate),
        cmocka_unit_test(test_batch_backend_vs_host),
        cmocka_unit_test(test_compare_catches_a_difference),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
