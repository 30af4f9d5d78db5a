/* tests/unit/test_matmul.c — matmul and activation quantization: cpu vs ref on every
 * weight type and every SIMD level the CPU has, batch invariance (rows alone vs batched,
 * 1/2/3 threads: memcmp-equal), and the reference itself against double-precision dots.
 *
 * Tolerance (kernels/ops.h): |y - y_ref| <= 1e-4 * (sum_k |x_k w_k| + |bias|), the sum in
 * double from the dequantized weights; NaN/inf fails; bytes of y outside the [T][N] part
 * (row gaps and a guard tail) must keep their fill.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/alloc.h"
#include "kernels/ops.h"
#include "kernels/cpu/cpu_impl.h"
#include "tests/unit/weight_fill.h"

static const mn_dtype TYPES[] = {MN_F32, MN_F16, MN_BF16, MN_Q4_0, MN_Q4_1, MN_Q5_0, MN_Q5_1, MN_Q8_0, MN_Q2_K, MN_Q3_K, MN_Q4_K, MN_Q5_K, MN_Q6_K};
enum { NTYPES = sizeof(TYPES) / sizeof(TYPES[0]) };
static const char *const LEVELS[] = {"scalar", "avx2", "avx512", "avx512-vnni"};

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}
static float frand(float lo, float hi) { return lo + (hi - lo) * (float)(rnd() & 0xffffff) / 16777216.0f; }


/* ---- running the cpu op on nth real threads ----------------------------------------- */
typedef struct job { const mn_matmul_desc *d; void *work; mn_par par; const mn_lora_desc *lora; } job;
static void barrier_wait(void *ctx) { pthread_barrier_wait((pthread_barrier_t *)ctx); }
static void *job_main(void *arg) {
    job *j = (job *)arg;
    if (j->lora) mn_cpu_matmul_prefetch_lora(j->d, j->lora, 0.25, 0.75, j->work, &j->par);
    else mn_cpu_matmul(j->d, j->work, &j->par);
    return NULL;
}
static void run_cpu_lora(const mn_matmul_desc *d, const mn_lora_desc *lora, int nth) {
    size_t wb = mn_cpu_matmul_work_bytes(d, nth);
    void *work = mn_malloc(wb ? wb : 1);
    assert_non_null(work);
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, (unsigned)nth);
    job jobs[8];
    pthread_t th[8];
    for (int i = 0; i < nth; i++) jobs[i] = (job){d, work, {i, nth, barrier_wait, &bar}, lora};
    for (int i = 1; i < nth; i++) assert_int_equal(pthread_create(&th[i], NULL, job_main, &jobs[i]), 0);
    job_main(&jobs[0]);
    for (int i = 1; i < nth; i++) pthread_join(th[i], NULL);
    pthread_barrier_destroy(&bar);
    mn_free(work);
}

static void run_cpu(const mn_matmul_desc *d, int nth) { run_cpu_lora(d, NULL, nth); }

/* ---- one case --------------------------------------------------------------------------- */
typedef struct mcase {
    mn_dtype t; int64_t T, N, K, xs, ys;
    float *x, *bias, *y0, *ydeq;   /* ydeq: dequantized weights [N][K] */
    void *w; int64_t rb;
    double *mag;                   /* [T][N] sum |x w| + |b| */
} mcase;

static void case_make(mcase *c, mn_dtype t, int64_t T, int64_t N, int64_t K, int with_bias) {
    c->t = t; c->T = T; c->N = N; c->K = K; c->xs = K + 3; c->ys = N + 5;
    c->rb = mn_dtype_row_bytes(t, K);
    c->x = mn_malloc(sizeof(float) * (size_t)(T * c->xs));
    c->w = mn_malloc((size_t)(N * c->rb));
    c->ydeq = mn_malloc(sizeof(float) * (size_t)(N * K));
    c->bias = with_bias ? mn_malloc(sizeof(float) * (size_t)N) : NULL;
    c->y0 = mn_malloc(sizeof(float) * (size_t)(T * c->ys + 16));
    c->mag = mn_malloc(sizeof(double) * (size_t)(T * N));
    for (int64_t i = 0; i < T * c->xs; i++) c->x[i] = frand(-2, 2) * ((rnd() & 7) == 0 ? 4.0f : 1.0f);
    mn_test_fill_weights(t, c->w, N, K, rnd, frand);
    for (int64_t n = 0; n < N; n++) mn_ref_dequant_row(t, (char *)c->w + n * c->rb, c->ydeq + n * K, K);
    if (c->bias) for (int64_t n = 0; n < N; n++) c->bias[n] = frand(-1, 1);
    for (int64_t i = 0; i < T * c->ys + 16; i++) c->y0[i] = frand(-1, 1);
    for (int64_t tt = 0; tt < T; tt++)
        for (int64_t n = 0; n < N; n++) {
            double s = c->bias ? fabs(c->bias[n]) : 0.0;
            for (int64_t k = 0; k < K; k++) s += fabs((double)c->x[tt * c->xs + k] * c->ydeq[n * K + k]);
            c->mag[tt * N + n] = s;
        }
}
static void case_free(mcase *c) {
    mn_free(c->x); mn_free(c->w); mn_free(c->ydeq); mn_free(c->bias); mn_free(c->y0); mn_free(c->mag);
}
static mn_matmul_desc case_desc(const mcase *c, float *y, int acc) {
    return (mn_matmul_desc){.T = c->T, .N = c->N, .K = c->K, .x = c->x, .x_stride = c->xs, .w = c->w,
                            .w_type = c->t, .w_row_bytes = c->rb, .bias = c->bias, .y = y,
                            .y_stride = c->ys, .accumulate = acc};
}
static float *ybuf(const mcase *c) {
    float *y = mn_malloc(sizeof(float) * (size_t)(c->T * c->ys + 16));
    memcpy(y, c->y0, sizeof(float) * (size_t)(c->T * c->ys + 16));
    return y;
}

/* cpu vs ref on one case at every level; returns the number of levels run. */
static int check_case(mcase *c, int acc, int nth) {
    float *yr = ybuf(c);
    mn_matmul_desc dr = case_desc(c, yr, acc);
    mn_ref_matmul(&dr);
    int ran = 0;
    for (int l = 0; l < 4; l++) {
        if (!mn_cpu_set_simd(LEVELS[l])) continue;
        ran++;
        float *y = ybuf(c);
        mn_matmul_desc d = case_desc(c, y, acc);
        run_cpu(&d, nth);
        for (int64_t i = 0; i < c->T * c->ys + 16; i++) {
            int64_t tt = i / c->ys, n = i % c->ys;
            if (tt < c->T && n < c->N) {
                double tol = 1e-4 * c->mag[tt * c->N + n] + (acc ? 1e-6 * fabs(c->y0[i]) : 0.0);
                if (!isfinite(y[i]) || fabs((double)y[i] - yr[i]) > tol) {
                    print_error("%s %s T=%lld N=%lld K=%lld acc=%d: y[%lld,%lld] = %.9g, ref %.9g (tol %.3g)\n",
                                LEVELS[l], mn_dtype_name(c->t), (long long)c->T, (long long)c->N, (long long)c->K,
                                acc, (long long)tt, (long long)n, y[i], yr[i], tol);
                    fail();
                }
            } else if (memcmp(&y[i], &c->y0[i], sizeof(float)) != 0) {
                print_error("%s %s: write outside the output at float %lld\n", LEVELS[l], mn_dtype_name(c->t), (long long)i);
                fail();
            }
        }
        mn_free(y);
    }
    mn_cpu_set_simd(LEVELS[0]);
    for (int l = 3; l >= 0; l--) if (mn_cpu_set_simd(LEVELS[l])) break; /* restore the best level */
    mn_free(yr);
    return ran;
}

static void test_cpu_vs_ref(void **state) {
    (void)state;
    mn_cpu_init();
    static const int64_t Ts[] = {1, 2, 3, 5, 8, 17, 64}, Ns[] = {1, 7, 32, 33, 129};
    int cases = 0;
    for (int ti = 0; ti < NTYPES; ti++) {
        mn_dtype t = TYPES[ti];
        int64_t be = mn_dtype_block_elems(t);
        int64_t Ks[3] = {be == 1 ? 13 : be, be == 1 ? 64 : 2 * be, be == 1 ? 576 : 18 * be};
        for (int ki = 0; ki < 3; ki++)
            for (int a = 0; a < 7; a++)
                for (int b = 0; b < 5; b++) {
                    /* the largest shapes only for the cheaper K: keeps the ref's cost down */
                    if (Ks[ki] * Ts[a] * Ns[b] > 2000000 && (a + b) % 3 != 0) continue;
                    mcase c;
                    case_make(&c, t, Ts[a], Ns[b], Ks[ki], (a + b) & 1);
                    cases += check_case(&c, (a + ki) & 1, 1 + ((a + b + ki) % 2));
                    case_free(&c);
                }
    }
    assert_true(cases > 0);
}

/* Batch invariance: T=37 together == each row alone == other thread counts, bit for bit. */
static void test_batch_invariance(void **state) {
    (void)state;
    mn_cpu_init();
    for (int ti = 0; ti < NTYPES; ti++) {
        mn_dtype t = TYPES[ti];
        int64_t be = mn_dtype_block_elems(t);
        int64_t K = be == 1 ? 200 : (be == MN_QK ? 18 * MN_QK : 3 * MN_QK_K);
        mcase c;
        case_make(&c, t, 37, 45, K, 1);
        for (int l = 0; l < 4; l++) {
            if (!mn_cpu_set_simd(LEVELS[l])) continue;
            float *yall = ybuf(&c);
            mn_matmul_desc d = case_desc(&c, yall, 0);
            run_cpu(&d, 1);
            for (int nth = 2; nth <= 3; nth++) {
                float *y = ybuf(&c);
                mn_matmul_desc dn = case_desc(&c, y, 0);
                run_cpu(&dn, nth);
                if (memcmp(y, yall, sizeof(float) * (size_t)(c.T * c.ys)) != 0) {
                    print_error("%s %s: nth=%d differs from nth=1\n", LEVELS[l], mn_dtype_name(t), nth);
                    fail();
                }
                mn_free(y);
            }
            /* each row alone, and a middle slice of 11 rows, on 2 threads */
            for (int64_t r = 0; r < c.T; r++) {
                float y1[64];
                mn_matmul_desc d1 = case_desc(&c, y1, 0);
                d1.T = 1; d1.x = c.x + r * c.xs; d1.y = y1;
                run_cpu(&d1, 1 + (int)(r % 2));
                if (memcmp(y1, yall + r * c.ys, sizeof(float) * (size_t)c.N) != 0) {
                    print_error("%s %s: row %lld alone differs from the batch\n", LEVELS[l], mn_dtype_name(t), (long long)r);
                    fail();
                }
            }
            float *ys = ybuf(&c);
            mn_matmul_desc dsl = case_desc(&c, ys, 0);
            dsl.T = 11; dsl.x = c.x + 13 * c.xs;
            run_cpu(&dsl, 3);
            for (int64_t r = 0; r < 11; r++) assert_memory_equal(ys + r * c.ys, yall + (13 + r) * c.ys, sizeof(float) * (size_t)c.N);
            mn_free(ys);
            mn_free(yall);
        }
        for (int l = 3; l >= 0; l--) if (mn_cpu_set_simd(LEVELS[l])) break;
        case_free(&c);
    }
}

/* Every case of types[0..ntypes) x T x N, K = nblk blocks, bias and accumulate, 1 and 2
 * threads, at every level: the output bytes (guard tail included) must equal
 * mn_ref_matmul's. Returns the number of comparisons. */
static int equal_ref_cases(const mn_dtype *types, int ntypes, int64_t nblk) {
    static const int64_t Ts[] = {1, 8, 9, 37}, Ns[] = {13, 45};
    int compared = 0;
    for (int ty = 0; ty < ntypes; ty++)
    for (int ti = 0; ti < 4; ti++)
        for (int ni = 0; ni < 2; ni++) {
            mcase c;
            case_make(&c, types[ty], Ts[ti], Ns[ni], nblk * mn_dtype_block_elems(types[ty]), ni);
            for (int acc = 0; acc <= 1; acc++) {
                float *yr = ybuf(&c);
                mn_matmul_desc dr = case_desc(&c, yr, acc);
                mn_ref_matmul(&dr);
                for (int l = 0; l < 4; l++) {
                    if (!mn_cpu_set_simd(LEVELS[l])) continue;
                    float *y = ybuf(&c);
                    mn_matmul_desc d = case_desc(&c, y, acc);
                    run_cpu(&d, 1 + acc);
                    if (memcmp(y, yr, sizeof(float) * (size_t)(c.T * c.ys + 16)) != 0) {
                        print_error("%s %s T=%lld N=%lld K=%lld acc=%d: differs from the reference\n", LEVELS[l],
                                    mn_dtype_name(types[ty]), (long long)c.T, (long long)c.N, (long long)c.K, acc);
                        fail();
                    }
                    mn_free(y);
                    compared++;
                }
                for (int l = 3; l >= 0; l--) if (mn_cpu_set_simd(LEVELS[l])) break;
                mn_free(yr);
            }
            case_free(&c);
        }
    return compared;
}

/* The legacy quants promise more than the tolerance: every level computes the reference's
 * per-element sequence (exact block dots, then acc + (dw*dx)*isum in block order; Q4_1
 * and Q5_1 add their min term inside), so the output must equal mn_ref_matmul bit for bit: decode
 * tiles (T <= 8), repacked prefill tiles (T > 8), row counts that leave a short 8- or
 * 16-row group, bias and accumulate, 1 and 2 threads. */
static void test_legacy_quants_equal_ref(void **state) {
    (void)state;
    mn_cpu_init();
    static const mn_dtype types[] = {MN_Q8_0, MN_Q4_0, MN_Q4_1, MN_Q5_0, MN_Q5_1};
    assert_true(equal_ref_cases(types, 5, 7) >= 5 * 4 * 2 * 2); /* at least the scalar level of every case */
}

/* The K-quants likewise: per super-block exact isum (and imin), then the reference's
 * acc + ((d*dx)*isum - (dmin*dx)*imin) (Q6_K, Q3_K: acc + (d*dx)*isum) in super-block order,
 * one lane per row; K = 2 and 3 super-blocks. */
static void test_kquants_equal_ref(void **state) {
    (void)state;
    mn_cpu_init();
    static const mn_dtype types[] = {MN_Q2_K, MN_Q3_K, MN_Q4_K, MN_Q5_K, MN_Q6_K};
    int compared = 0;
    for (int64_t nblk = 2; nblk <= 3; nblk++) compared += equal_ref_cases(types, 5, nblk);
    assert_true(compared >= 2 * 5 * 4 * 2 * 2);
}
/* The reference against double-precision dots: (1) on the quantized-then-dequantized
 * activations it must agree to f32 accumulation error; (2) on the original x it must be
 * within the activation quantization error sum_k |w_k| * d_k / 2. */
/* The matmul that prefetches the next LoRA op's weights (the CPU backend's path before a
 * LoRA op) computes its rows in slices: the same bits as without, at every level, type and
 * thread count; and the bytes it asks for are the op's A rows unless it only expands, its
 * B rows unless it only shrinks, and no more than the first 256 KB of them (the op's own
 * prefetches stream the rest). */
static void test_prefetch_lora_same_bits(void **state) {
    (void)state;
    enum { R = 8, KL = 96, N0 = 40, N1 = 24 };
    uint16_t *a = mn_malloc(2 * 2 * R * KL), *b0 = mn_malloc(2 * 2 * R * N0), *b1 = mn_malloc(2 * 2 * R * N1);
    assert_true(a && b0 && b1);
    for (int i = 0; i < 2 * R * KL; i++) a[i] = (uint16_t)rnd();
    mn_lora_seg seg[2];
    for (int s = 0; s < 2; s++)
        seg[s] = (mn_lora_seg){.start = s, .n_rows = 1, .r = R, .type = MN_F16, .a = a + s * R * KL,
                               .b = {b0 + s * R * N0, b1 + s * R * N1}, .r_off = {0, 0}, .r_out = {R, R}, .scale = {1, 1}};
    mn_lora_desc lora = {.K = KL, .n_out = 2, .N = {N0, N1}, .n_seg = 2, .seg = seg};
    const int64_t a_bytes = 2 * R * KL * 2, b_bytes = 2 * R * (N0 + N1) * 2;
    assert_int_equal(mn__cpu_lora_prefetch_bytes(&lora), a_bytes + b_bytes);
    lora.phase = MN_LORA_SHRINK;
    assert_int_equal(mn__cpu_lora_prefetch_bytes(&lora), a_bytes);
    lora.phase = MN_LORA_EXPAND;
    assert_int_equal(mn__cpu_lora_prefetch_bytes(&lora), b_bytes);
    lora.phase = MN_LORA_FUSED;
    mn_lora_desc wide = lora;   /* sizes only: nothing is read */
    wide.K = 1 << 20;
    assert_int_equal(mn__cpu_lora_prefetch_bytes(&wide), 256 << 10);
    const int64_t Ts[] = {1, 5, 40};
    int cases = 0;
    for (size_t ti = 0; ti < sizeof TYPES / sizeof TYPES[0]; ti++)
        for (int k = 0; k < 3; k++) {
            mcase c;
            case_make(&c, TYPES[ti], Ts[k], 70, 512, k == 1);
            for (int l = 0; l < 4; l++) {
                if (!mn_cpu_set_simd(LEVELS[l])) continue;
                for (int nth = 1; nth <= 2; nth++) {
                    float *y0 = ybuf(&c), *y1 = ybuf(&c);
                    mn_matmul_desc d0 = case_desc(&c, y0, 0), d1 = case_desc(&c, y1, 0);
                    run_cpu(&d0, nth);
                    run_cpu_lora(&d1, &lora, nth);
                    if (memcmp(y0, y1, sizeof(float) * (size_t)(c.T * c.ys + 16)) != 0) {
                        print_error("%s %s T=%lld nth=%d: the prefetching matmul differs\n", LEVELS[l],
                                    mn_dtype_name(c.t), (long long)c.T, nth);
                        fail();
                    }
                    mn_free(y0);
                    mn_free(y1);
                    cases++;
                }
            }
            case_free(&c);
        }
    for (int l = 3; l >= 0; l--) if (mn_cpu_set_simd(LEVELS[l])) break; /* restore the best level */
    assert_true(cases >= 9 * 3 * 2);
    mn_free(a); mn_free(b0); mn_free(b1);
}

static void test_ref_vs_double(void **state) {
    (void)state;
    for (int ti = 0; ti < NTYPES; ti++) {
        mn_dtype t = TYPES[ti];
        int64_t be = mn_dtype_block_elems(t), K = be == 1 ? 96 : 4 * be, N = 9, T = 3;
        mcase c;
        case_make(&c, t, T, N, K, 0);
        float y[3 * 16];
        mn_matmul_desc d = case_desc(&c, y, 0);
        d.y_stride = 16;
        mn_ref_matmul(&d);
        float *xdq = mn_malloc(sizeof(float) * (size_t)K), *dk = mn_malloc(sizeof(float) * (size_t)K);
        void *xq = mn_malloc((size_t)K * 2 + 1024);
        for (int64_t tt = 0; tt < T; tt++) {
            const float *x = c.x + tt * c.xs;
            if (be == 1) {
                memcpy(xdq, x, sizeof(float) * (size_t)K);
                for (int64_t k = 0; k < K; k++) dk[k] = 0.0f;
            } else {
                mn_dtype at = be == MN_QK ? MN_Q8_1 : MN_Q8_K;
                if (at == MN_Q8_1) mn_ref_quantize_row_q8_1(x, xq, K); else mn_ref_quantize_row_q8_K(x, xq, K);
                mn_ref_dequant_row(at, xq, xdq, K);
                for (int64_t k = 0; k < K; k++) {
                    float dd = at == MN_Q8_1 ? ((mn_block_q8_1 *)xq)[k / MN_QK].d : ((mn_block_q8_K *)xq)[k / MN_QK_K].d;
                    dk[k] = dd;
                    assert_true(fabs((double)xdq[k] - x[k]) <= 0.5 * dd * (1 + 1e-5)); /* nearest rounding */
                }
            }
            for (int64_t n = 0; n < N; n++) {
                double dq = 0, ex = 0, mag = 0, qerr = 0;
                for (int64_t k = 0; k < K; k++) {
                    double w = c.ydeq[n * K + k];
                    dq += w * xdq[k]; ex += w * x[k]; mag += fabs(w * xdq[k]); qerr += fabs(w) * dk[k] * 0.5;
                }
                double got = y[tt * 16 + n];
                if (fabs(got - dq) > 2e-6 * mag + 1e-30 || fabs(got - ex) > qerr * 1.001 + 2e-6 * mag) {
                    print_error("ref %s t=%lld n=%lld: %.9g vs double %.9g (orig x %.9g, qerr %.3g)\n",
                                mn_dtype_name(t), (long long)tt, (long long)n, got, dq, ex, qerr);
                    fail();
                }
            }
        }
        mn_free(xdq); mn_free(dk); mn_free(xq);
        case_free(&c);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ref_vs_double),
        cmocka_unit_test(test_cpu_vs_ref),
        cmocka_unit_test(test_batch_invariance),
        cmocka_unit_test(test_legacy_quants_equal_ref),
        cmocka_unit_test(test_kquants_equal_ref),
        cmocka_unit_test(test_prefetch_lora_same_bits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
