/* tests/unit/test_gemv.c — the CUDA fused dequant GEMV's arithmetic, checked on the CPU.
 *
 * No GPU is needed: kernels/cuda/matmul_gemv.h holds the kernel's per-row arithmetic as
 * host-and-device functions (the integer block dots of kernels/quant_math.h, the lane
 * split, the group sums of the K-quants) and mn_gemv_emulate, which runs them for all 32
 * lanes of every row's warp and sums the lanes with the kernel's xor butterfly. This test
 * compares that emulation with mn_ref_matmul for every weight type:
 *   - T = 1, 2, 5, 8 on odd N and K (partial warp steps: K-quant rows whose last step has
 *     idle lane groups, legacy rows with fewer blocks than lanes, float rows with a K % 8
 *     tail), strided x and y, bias, accumulate: |y - ref| <= 1e-4 * (sum|x w| + |b|) (+ the
 *     last rounding of an accumulate), the sum in double on the dequantized weights;
 *     NaN/inf fails; y's row gaps and a guard tail keep their bytes;
 *   - one block per row (K = 32 / 256; float K = 8): the kernel adds nothing but lane 0's
 *     block value, so y must equal the reference's bits (checks every block formula
 *     exactly, not just within a tolerance);
 *   - each token alone (T = 1) gives its batch row's bits.
 * What is not emulated here: the quantize kernel (its blocks are mn_ref_quantize_row_*'s by
 * construction: exact max and integer sums, the shared mn_q8_value) and the device loads
 * (16-byte float loads, 2-byte halves of quant words: same values). tests/gpu checks the
 * real kernel against this emulation bit for bit.
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

#include "kernels/cuda/matmul_gemv.h"
#include "tests/unit/weight_fill.h"

static const mn_dtype TYPES[] = {MN_F32, MN_F16, MN_BF16, MN_Q4_0, MN_Q4_1, MN_Q5_0, MN_Q5_1, MN_Q8_0, MN_Q2_K, MN_Q3_K, MN_Q4_K, MN_Q5_K, MN_Q6_K};
enum { NTYPES = sizeof(TYPES) / sizeof(TYPES[0]), GUARD = 16 };

static uint64_t rng = 0x2545f4914f6cdd1dull;
static uint32_t rnd(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}
static float frand(float lo, float hi) { return lo + (hi - lo) * (float)(rnd() & 0xffffff) / 16777216.0f; }


/* One problem: host buffers for x, W, bias and two copies of y (ref, emulation). */
typedef struct prob {
    mn_matmul_desc d;
    float *x, *bias, *y0, *yref, *yemu;
    uint8_t *w;
    size_t ybytes;
    void *work;
} prob;

static void prob_make(prob *p, mn_dtype t, int64_t T, int64_t N, int64_t K, int strided, int bias, int acc) {
    memset(p, 0, sizeof *p);
    mn_matmul_desc *d = &p->d;
    d->T = T, d->N = N, d->K = K, d->w_type = t, d->accumulate = acc;
    d->x_stride = strided ? K + 3 : K;
    d->y_stride = strided ? N + 5 : N;
    d->w_row_bytes = mn_dtype_row_bytes(t, K);
    p->x = malloc((size_t)(T * d->x_stride) * sizeof(float));
    for (int64_t i = 0; i < T * d->x_stride; i++) p->x[i] = frand(-1, 1);
    if (T > 2) /* a row of zeros (d = 0) and one with a large outlier */
        for (int64_t k = 0; k < K; k++) p->x[1 * d->x_stride + k] = k == K / 2 ? 37.0f : p->x[1 * d->x_stride + k];
    if (T > 3)
        for (int64_t k = 0; k < K; k++) p->x[3 * d->x_stride + k] = 0.0f;
    p->w = malloc((size_t)(N * d->w_row_bytes));
    mn_test_fill_weights(t, p->w, N, K, rnd, frand);
    if (bias) {
        p->bias = malloc((size_t)N * sizeof(float));
        for (int64_t n = 0; n < N; n++) p->bias[n] = frand(-1, 1);
    }
    p->ybytes = (size_t)(T * d->y_stride) * sizeof(float) + GUARD;
    p->y0 = malloc(p->ybytes);
    p->yref = malloc(p->ybytes);
    p->yemu = malloc(p->ybytes);
    memset(p->y0, 0xa5, p->ybytes);
    for (int64_t ti = 0; ti < T; ti++)
        for (int64_t n = 0; n < N; n++) p->y0[ti * d->y_stride + n] = acc ? frand(-2, 2) : 0.0f;
    memcpy(p->yref, p->y0, p->ybytes);
    memcpy(p->yemu, p->y0, p->ybytes);
    d->x = p->x, d->w = p->w, d->bias = p->bias;
    size_t wb = mn_gemv_emulate_work_bytes(d);
    p->work = malloc(wb ? wb : 1);
}

static void prob_free(prob *p) {
    free(p->x), free(p->w), free(p->bias), free(p->y0), free(p->yref), free(p->yemu), free(p->work);
}

static void run_both(prob *p) {
    mn_matmul_desc d = p->d;
    d.y = p->yref;
    mn_ref_matmul(&d);
    d.y = p->yemu;
    mn_gemv_emulate(&d, p->work);
}

/* Emulation vs reference under the contract's tolerance; returns the worst err/tol. */
static double check_tol(const prob *p) {
    const mn_matmul_desc *d = &p->d;
    float *wrow = malloc((size_t)d->K * sizeof(float));
    double worst = 0.0;
    for (int64_t n = 0; n < d->N; n++) {
        mn_ref_dequant_row(d->w_type, p->w + n * d->w_row_bytes, wrow, d->K);
        for (int64_t t = 0; t < d->T; t++) {
            double s = p->bias ? fabs(p->bias[n]) : 0.0;
            for (int64_t k = 0; k < d->K; k++) s += fabs((double)p->x[t * d->x_stride + k] * wrow[k]);
            int64_t i = t * d->y_stride + n;
            double got = p->yemu[i], want = p->yref[i];
            /* an accumulate adds one more f32 rounding of y + v on both sides */
            double tol = 1e-4 * s + (d->accumulate ? 2.4e-7 * (fabs(p->y0[i]) + fabs(want)) : 0.0) + 1e-30;
            if (!isfinite(got) || !(fabs(got - want) <= tol))
                fail_msg("%s T=%lld N=%lld K=%lld: y[%lld,%lld] = %.9g, ref %.9g, tol %.3g", mn_dtype_name(d->w_type),
                         (long long)d->T, (long long)d->N, (long long)d->K, (long long)t, (long long)n, got, want, tol);
            if (fabs(got - want) / tol > worst) worst = fabs(got - want) / tol;
        }
    }
    /* row gaps and the guard tail: untouched */
    const uint8_t *a = (const uint8_t *)p->yemu, *b = (const uint8_t *)p->y0;
    for (size_t i = 0; i < p->ybytes; i += 4) {
        int64_t e = (int64_t)(i / 4), r = e / d->y_stride, c = e % d->y_stride;
        if ((r >= d->T || c >= d->N) && memcmp(a + i, b + i, 4) != 0)
            fail_msg("%s: wrote outside y at float %lld", mn_dtype_name(d->w_type), (long long)e);
    }
    free(wrow);
    return worst;
}

/* Every type, T = 1, 2, 5, 8, odd shapes, strides, bias, accumulate: within the tolerance;
 * and every token alone gives its batch row's bits. */
static void test_gemv_emulation_vs_ref(void **state) {
    (void)state;
    static const int64_t Ts[] = {1, 2, 5, 8};
    for (int ti = 0; ti < NTYPES; ti++) {
        mn_dtype t = TYPES[ti];
        int64_t be = mn_dtype_block_elems(t);
        /* float: a K % 8 tail, and more chunks than lanes; legacy: fewer blocks than lanes,
         * then 45 (a partial second step); K-quants: 3 and 5 super-blocks (idle groups) and 17 */
        int64_t Ks[3];
        if (be == 1) Ks[0] = 77, Ks[1] = 333, Ks[2] = 1029;
        else if (be == MN_QK) Ks[0] = 9 * 32, Ks[1] = 45 * 32, Ks[2] = 71 * 32;
        else Ks[0] = 3 * 256, Ks[1] = 5 * 256, Ks[2] = 17 * 256;
        double worst = 0.0;
        for (int ki = 0; ki < 3; ki++)
            for (int tj = 0; tj < 4; tj++) {
                int variant = (ki * 4 + tj) % 4; /* plain, strided+bias, accumulate+bias, all */
                prob p;
                prob_make(&p, t, Ts[tj], 37, Ks[ki], variant & 1, variant != 0, variant >= 2);
                run_both(&p);
                double w = check_tol(&p);
                worst = w > worst ? w : worst;
                /* batch invariance: token ti alone -> the same bits as in the batch */
                for (int64_t tok = 0; tok < p.d.T; tok++) {
                    mn_matmul_desc one = p.d;
                    one.T = 1;
                    one.x = p.x + tok * p.d.x_stride;
                    float *y1 = malloc((size_t)p.d.N * sizeof(float));
                    for (int64_t n = 0; n < p.d.N; n++) y1[n] = p.y0[tok * p.d.y_stride + n];
                    one.y = y1;
                    one.y_stride = p.d.N;
                    mn_gemv_emulate(&one, p.work);
                    if (memcmp(y1, p.yemu + tok * p.d.y_stride, (size_t)p.d.N * sizeof(float)) != 0)
                        fail_msg("%s K=%lld: token %lld alone differs from its batch row", mn_dtype_name(t),
                                 (long long)Ks[ki], (long long)tok);
                    free(y1);
                }
                prob_free(&p);
            }
        printf("gemv emulation %-5s vs ref: worst err/tol %.3g\n", mn_dtype_name(t), worst);
    }
}

/* One block per row: the emulation must give the reference's bits (block formulas exact). */
static void test_gemv_one_block_bit_exact(void **state) {
    (void)state;
    for (int ti = 0; ti < NTYPES; ti++) {
        mn_dtype t = TYPES[ti];
        int64_t be = mn_dtype_block_elems(t);
        for (int variant = 0; variant < 3; variant++) {
            prob p;
            prob_make(&p, t, 5, 53, be == 1 ? 8 : be, variant == 1, variant >= 1, variant == 2);
            run_both(&p);
            for (int64_t tok = 0; tok < p.d.T; tok++)
                for (int64_t n = 0; n < p.d.N; n++) {
                    int64_t i = tok * p.d.y_stride + n;
                    if (memcmp(&p.yemu[i], &p.yref[i], 4) != 0)
                        fail_msg("%s one block, variant %d: y[%lld,%lld] = %.9g, ref %.9g (bits differ)",
                                 mn_dtype_name(t), variant, (long long)tok, (long long)n, p.yemu[i], p.yref[i]);
                }
            prob_free(&p);
        }
    }
}

/* The integer helpers against plain loops: dp4a on signed bytes, the unaligned loader. */
static void test_gemv_int_helpers(void **state) {
    (void)state;
    for (int r = 0; r < 10000; r++) {
        uint32_t a = rnd() ^ (rnd() << 16), b = rnd() ^ (rnd() << 16);
        int c = (int)(rnd() % 1000) - 500, want = c;
        for (int i = 0; i < 4; i++) want += (int8_t)(a >> (8 * i)) * (int8_t)(b >> (8 * i));
        assert_int_equal(mn_dp4a(a, b, c), want);
    }
    uint8_t buf[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    assert_int_equal(mn_ld4_a2(buf + 2), 0x06050403u);
    assert_int_equal(mn_q8_value(2.5f, 1.0f), 2); /* ties to even */
    assert_int_equal(mn_q8_value(-3.5f, 1.0f), -4);
    assert_int_equal(mn_q8_value(1.0f, 0.0f), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gemv_int_helpers),
        cmocka_unit_test(test_gemv_one_block_bit_exact),
        cmocka_unit_test(test_gemv_emulation_vs_ref),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
