/* tests/unit/test_sample_op.c — the sample op (kernels/ops.h): mn_cpu_sample against
 * mn_ref_sample, and MN_OP_SAMPLE on the CPU backend against mn_sampler_sample.
 *
 *   - cpu vs ref: every parameter combination (temperature incl. greedy, top_k incl. 1,
 *     V-1, V and > V, top_p, min_p, n_logprobs) on small vocabularies, a random share of
 *     them at odd sizes up to 128257; logit rows of six kinds (ties, -inf and NaN, all
 *     equal, +-0.0, peaked); u = 0, 1 - 2^-53, random, and exactly on a cumulative
 *     boundary. Rows go in batches with a row stride, split over 3 threads. Tokens must
 *     be the reference's except in a boundary case the contract allows (sample_check.h);
 *     top ids exact, logprobs within MN_SAMPLE_TOL.
 *   - backend: a compute list with MN_OP_SAMPLE on the CPU backend (2 threads, 4 rows)
 *     gives mn_sampler_sample's tokens and logprobs, token for token over 50 steps, with u
 *     drawn by this file's own xoshiro256** from the sampler's saved RNG state.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/backend.h"
#include "engine/sampler.h"
#include "kernels/ops.h"
#include "sample_check.h"

enum { ROWS = 6, TOP = MN_SAMPLE_MAX_TOP };

static long n_cases, n_boundary;

/* One batch of ROWS rows of vocabulary V: random kinds, the given parameter indices. */
static void run_batch(int32_t V, const int *pidx, int u_mode) {
    int64_t stride = (int64_t)V + 3;
    float *l = malloc((size_t)(stride * ROWS) * sizeof *l);
    mn_sample_params ps[ROWS];
    for (int r = 0; r < ROWS; r++) {
        sc_fill(l + r * stride, V, (int)(sc_rand() * SC_KINDS));
        ps[r] = sc_params(pidx[r], V);
        ps[r].u = sc_u(u_mode, l + r * stride, V, &ps[r]);
    }
    int32_t tok[2][ROWS], tid[2][ROWS * TOP];
    float lp[2][ROWS], tlp[2][ROWS * TOP];
    mn_sample_desc d = { ROWS, V, l, stride, ps, tok[0], lp[0], tid[0], tlp[0] };
    mn_ref_sample(&d);
    d.token = tok[1]; d.logprob = lp[1]; d.top_id = tid[1]; d.top_logprob = tlp[1];
    void *work = malloc(mn_cpu_sample_work_bytes(&d, 3));
    for (int ith = 0; ith < 3; ith++) {   /* the op has no barrier: threads in turn */
        mn_par par = { ith, 3, NULL, NULL };
        mn_cpu_sample(&d, work, &par);
    }
    for (int r = 0; r < ROWS; r++) {
        char why[200];
        int boundary;
        n_cases++;
        if (!sc_check(l + r * stride, V, &ps[r], tok[1][r], &lp[1][r], tid[1] + r * TOP, tlp[1] + r * TOP, tok[0][r],
                      tid[0] + r * TOP, why, sizeof why, &boundary))
            fail_msg("cpu V %d row %d (T %g k %d p %g min_p %g u %.17g): %s", (int)V, r, (double)ps[r].temperature,
                     (int)ps[r].top_k, (double)ps[r].top_p, (double)ps[r].min_p, ps[r].u, why);
        n_boundary += boundary;
        /* the reference itself against the contract's checker */
        if (!sc_check(l + r * stride, V, &ps[r], tok[0][r], &lp[0][r], tid[0] + r * TOP, tlp[0] + r * TOP, tok[0][r],
                      tid[0] + r * TOP, why, sizeof why, &boundary))
            fail_msg("ref V %d row %d: %s", (int)V, r, why);
    }
    free(work);
    free(l);
}

static void test_cpu_matches_ref(void **st) {
    (void)st;
    static const int32_t small[] = { 1, 2, 3, 17, 100, 1001 };
    for (size_t v = 0; v < sizeof small / sizeof small[0]; v++)
        for (int i = 0; i < SC_NPARAMS; i += ROWS)
            for (int u = 0; u < 4; u++) {
                int idx[ROWS];
                for (int r = 0; r < ROWS; r++) idx[r] = (i + r) % SC_NPARAMS;
                run_batch(small[v], idx, u);
            }
    static const int32_t big[] = { 4099, 50001, 128257 };
    for (size_t v = 0; v < sizeof big / sizeof big[0]; v++)
        for (int b = 0; b < 8; b++) {
            int idx[ROWS];
            for (int r = 0; r < ROWS; r++) idx[r] = (int)(sc_rand() * SC_NPARAMS);
            run_batch(big[v], idx, b % 4);
        }
    printf("sample cpu vs ref: %ld rows, %ld boundary cases\n", n_cases, n_boundary);
    assert_true(n_boundary * 100 <= n_cases);
}

/* ---- MN_OP_SAMPLE on the CPU backend against mn_sampler_sample ---------------------- */

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
/* xoshiro256** and the 53-bit uniform, as sampler.h describes them */
static double uniform_from(uint64_t s[4]) {
    uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t; s[3] = rotl(s[3], 45);
    return (double)(r >> 11) * (1.0 / 9007199254740992.0);
}

static void test_backend_op_matches_sampler(void **st) {
    (void)st;
    enum { V = 5003, R = 4, STEPS = 50 };
    mn_backend_params bp = { .device = "cpu", .n_threads = 2 };
    mn_backend *be = NULL;
    mn_errbuf eb;
    assert_int_equal(mn_backend_new(&bp, &be, NULL, &eb), MN_OK);
    mn_buffer *lb, *pb, *ob;
    size_t lbytes = (size_t)R * V * sizeof(float);
    assert_int_equal(mn_buffer_alloc(be, MN_MEM_DEVICE, lbytes, &lb, &eb), MN_OK);
    assert_int_equal(mn_buffer_alloc(be, MN_MEM_DEVICE, R * sizeof(mn_sample_params), &pb, &eb), MN_OK);
    assert_int_equal(mn_buffer_alloc(be, MN_MEM_DEVICE, R * (1 + 1 + 2 * TOP) * 4, &ob, &eb), MN_OK);
    float *l = lb->ptr;
    mn_sample_params *ps = pb->ptr;
    int32_t *tok = ob->ptr, *tid = tok + 2 * R;
    float *lp = (float *)(tok + R), *tlp = (float *)(tid + R * TOP);
    mn_sampling_params sp[R];
    mn_sampler *smp[R];
    for (int r = 0; r < R; r++) {
        sp[r] = mn_sampling_defaults();
        sp[r].seed = 100 + (uint64_t)r;
        sp[r].n_logprobs = 5 * r;
        sp[r].repeat_last_n = 0;
        if (r == 1) { sp[r].top_k = 0; sp[r].min_p = 0.0f; }                    /* top-p only */
        if (r == 2) { sp[r].temperature = 0.0f; }                               /* greedy */
        if (r == 3) { sp[r].top_k = 0; sp[r].top_p = 1.0f; sp[r].min_p = 0.0f; sp[r].temperature = 1.3f; }
        assert_int_equal(mn_sampler_new(&sp[r], V, &smp[r], &eb), MN_OK);
    }
    mn_op op = { .kind = MN_OP_SAMPLE };
    op.u.sample = (mn_sample_desc){ R, V, l, V, ps, tok, lp, tid, tlp };
    assert_int_equal(mn_backend_reserve(be, &op, 1, &eb), MN_OK);
    float *copy = malloc((size_t)V * sizeof *copy);
    for (int step = 0; step < STEPS; step++) {
        for (int r = 0; r < R; r++) {
            sc_fill(l + (int64_t)r * V, V, step % 2 ? 0 : 4);
            uint64_t s4[4];
            mn_sampler_get_rng(smp[r], s4);
            ps[r] = (mn_sample_params){ sp[r].temperature, sp[r].top_k, sp[r].top_p, sp[r].min_p,
                                        sp[r].temperature > 0.0f ? uniform_from(s4) : 0.0, sp[r].n_logprobs };
        }
        assert_int_equal(mn_backend_run(be, &op, 1, &eb), MN_OK);
        assert_int_equal(mn_backend_synchronize(be, &eb), MN_OK);
        for (int r = 0; r < R; r++) {
            memcpy(copy, l + (int64_t)r * V, (size_t)V * sizeof *copy);
            mn_sample_info info;
            int32_t t = mn_sampler_sample(smp[r], copy, &info);
            if (t != tok[r]) fail_msg("step %d row %d: backend token %d, sampler %d", step, r, (int)tok[r], (int)t);
            assert_true(info.logprob == lp[r]);
            assert_int_equal(info.n_top, sp[r].n_logprobs);
            for (int j = 0; j < info.n_top; j++) {
                assert_int_equal(info.top[j].token, tid[r * TOP + j]);
                assert_true(info.top[j].logprob == tlp[r * TOP + j]);
            }
        }
    }
    printf("MN_OP_SAMPLE on the cpu backend == mn_sampler_sample: %d steps x %d rows\n", STEPS, R);
    free(copy);
    for (int r = 0; r < R; r++) mn_sampler_free(smp[r]);
    mn_buffer_free(lb);
    mn_buffer_free(pb);
    mn_buffer_free(ob);
    mn_backend_free(be);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cpu_matches_ref),
        cmocka_unit_test(test_backend_op_matches_sampler),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
