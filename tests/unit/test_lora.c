/* tests/unit/test_lora.c — the batched LoRA op: CPU against the reference.
 *
 * Cases mix segments of ranks 4, 8, 16 and 64 (one of them a Q/K/V-style group with three
 * outputs of different ranks sharing one shrink, one where an output is not adapted),
 * rows scattered through the batch and rows with no adapter. Checked:
 *   - |y - ref| <= 1e-4 * (|y_in| + |s| * sum_j (sum_k |x_k a_jk|) |b_nj|) (the contract),
 *     computed here from the inputs; NaN or inf fails;
 *   - rows in no segment keep their exact bytes, and so do guard floats after each output;
 *   - 1 thread of scalar code and 3 threads of the best SIMD level give the same bits; a row
 *     computed alone (one segment of one row) gives the same bits as inside the batch
 *     (batch invariance).
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

#define GUARD 16

static uint32_t rng_state;
static const char *best_simd;
static float frand(void) {
    rng_state = rng_state * 1664525u + 1013904223u;
    return (float)((rng_state >> 8) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

/* ---- running the cpu op on nth real threads ---- */
typedef struct run_ctx {
    pthread_barrier_t bar;
    const mn_lora_desc *d;
    void *work;
    int nth;
} run_ctx;
typedef struct thr_arg { run_ctx *c; int ith; } thr_arg;

static void barrier_fn(void *ctx) { pthread_barrier_wait(&((run_ctx *)ctx)->bar); }

static void *thr_main(void *p) {
    thr_arg *a = p;
    mn_par par = {.ith = a->ith, .nth = a->c->nth, .barrier = barrier_fn, .ctx = a->c};
    mn_cpu_lora(a->c->d, a->c->work, &par);
    return NULL;
}

static void run_cpu(const mn_lora_desc *d, int nth) {
    run_ctx c = {.d = d, .nth = nth};
    size_t wb = mn_cpu_lora_work_bytes(d);
    c.work = malloc(wb + 4);
    pthread_barrier_init(&c.bar, NULL, (unsigned)nth);
    pthread_t tid[8];
    thr_arg args[8];
    for (int i = 0; i < nth; i++) args[i] = (thr_arg){&c, i};
    for (int i = 1; i < nth; i++) assert_int_equal(pthread_create(&tid[i], NULL, thr_main, &args[i]), 0);
    thr_main(&args[0]);
    for (int i = 1; i < nth; i++) pthread_join(tid[i], NULL);
    pthread_barrier_destroy(&c.bar);
    free(c.work);
}

/* ---- one case ---- */
typedef struct seg_spec {
    int32_t r_out[MN_LORA_MAX_OUT];   /* 0: output not adapted */
    int32_t n_rows;
} seg_spec;

static void run_case(const char *name, int64_t T, int64_t K, int n_out, const int64_t *N, const seg_spec *specs, int n_seg,
                     uint32_t seed) {
    rng_state = seed;
    float *x = malloc((size_t)(T * K) * sizeof(float));
    for (int64_t i = 0; i < T * K; i++) x[i] = frand();
    float *y0[MN_LORA_MAX_OUT], *yr[MN_LORA_MAX_OUT], *y1[MN_LORA_MAX_OUT], *y3[MN_LORA_MAX_OUT];
    for (int o = 0; o < n_out; o++) {
        size_t n = (size_t)(T * N[o] + GUARD);
        y0[o] = malloc(n * sizeof(float));
        yr[o] = malloc(n * sizeof(float));
        y1[o] = malloc(n * sizeof(float));
        y3[o] = malloc(n * sizeof(float));
        for (size_t i = 0; i < n; i++) y0[o][i] = frand() * 4.0f;
    }
    /* rows: a random permutation, the first sum(n_rows) of it adapted */
    int32_t *perm = malloc((size_t)T * sizeof(int32_t));
    for (int64_t i = 0; i < T; i++) perm[i] = (int32_t)i;
    for (int64_t i = T - 1; i > 0; i--) {
        int64_t j = (int64_t)((frand() + 1.0f) * 0.5f * (float)(i + 1));
        if (j > i) j = i;
        int32_t t = perm[i]; perm[i] = perm[j]; perm[j] = t;
    }
    mn_lora_seg segs[8];
    float *arena[8];
    int32_t at = 0;
    for (int s = 0; s < n_seg; s++) {
        mn_lora_seg *g = &segs[s];
        memset(g, 0, sizeof *g);
        g->start = at;
        g->n_rows = specs[s].n_rows;
        at += g->n_rows;
        for (int o = 0; o < n_out; o++) g->r += specs[s].r_out[o];
        size_t nf = (size_t)g->r * K;
        for (int o = 0; o < n_out; o++) nf += (size_t)N[o] * specs[s].r_out[o];
        arena[s] = malloc(nf * sizeof(float));
        float *p = arena[s];
        g->a = p;
        for (int64_t i = 0; i < g->r * K; i++) *p++ = frand() * 0.2f;
        int32_t off = 0;
        for (int o = 0; o < n_out; o++) {
            if (!specs[s].r_out[o]) continue;
            g->b[o] = p;
            g->r_off[o] = off;
            g->r_out[o] = specs[s].r_out[o];
            g->scale[o] = 0.5f + (float)o + (float)s * 0.25f;
            off += g->r_out[o];
            for (int64_t i = 0; i < N[o] * g->r_out[o]; i++) *p++ = frand() * 0.3f;
        }
    }
    assert_true(at <= T);
    mn_lora_desc d = {.K = K, .x = x, .x_stride = K, .n_out = n_out, .n_seg = n_seg, .seg = segs, .rows = perm};
    for (int o = 0; o < n_out; o++) {
        d.N[o] = N[o];
        d.y_stride[o] = N[o];
    }
    float **sets[3] = {yr, y1, y3};
    for (int v = 0; v < 3; v++) {
        for (int o = 0; o < n_out; o++) {
            memcpy(sets[v][o], y0[o], (size_t)(T * N[o] + GUARD) * sizeof(float));
            d.y[o] = sets[v][o];
        }
        /* v = 1: one thread, scalar code; v = 2: three threads, the best SIMD level */
        if (v == 0) mn_ref_lora(&d);
        else {
            mn_cpu_set_simd(v == 1 ? "scalar" : best_simd);
            run_cpu(&d, v == 1 ? 1 : 3);
        }
    }
    /* bound per element, from the inputs */
    double worst = 0;
    char *adapted = calloc((size_t)T, 1);
    for (int s = 0; s < n_seg; s++) {
        const mn_lora_seg *g = &segs[s];
        for (int32_t i = 0; i < g->n_rows; i++) {
            int64_t t = perm[g->start + i];
            adapted[t] = 1;
            double absv[256];
            for (int32_t j = 0; j < g->r; j++) {
                absv[j] = 0;
                for (int64_t k = 0; k < K; k++) absv[j] += fabs((double)x[t * K + k] * g->a[j * K + k]);
            }
            for (int o = 0; o < n_out; o++) {
                for (int64_t n = 0; n < N[o]; n++) {
                    double mag = fabs(y0[o][t * N[o] + n]);
                    for (int32_t j = 0; g->b[o] && j < g->r_out[o]; j++)
                        mag += fabs(g->scale[o]) * absv[g->r_off[o] + j] * fabs(g->b[o][j * N[o] + n]);
                    float got = y1[o][t * N[o] + n], want = yr[o][t * N[o] + n];
                    if (!isfinite(got)) fail_msg("%s: out %d row %lld col %lld: not finite", name, o, (long long)t, (long long)n);
                    double err = fabs((double)got - want);
                    if (err > 1e-4 * mag) fail_msg("%s: out %d row %lld col %lld: %.9g vs ref %.9g (bound %.3g)", name, o,
                                                   (long long)t, (long long)n, got, want, 1e-4 * mag);
                    if (err / (1e-4 * mag) > worst) worst = err / (1e-4 * mag);
                }
            }
        }
    }
    for (int o = 0; o < n_out; o++) {
        for (int64_t t = 0; t < T; t++)
            if (!adapted[t]) {
                assert_memory_equal(&y1[o][t * N[o]], &y0[o][t * N[o]], (size_t)N[o] * sizeof(float));
                assert_memory_equal(&yr[o][t * N[o]], &y0[o][t * N[o]], (size_t)N[o] * sizeof(float));
            }
        assert_memory_equal(&y1[o][T * N[o]], &y0[o][T * N[o]], GUARD * sizeof(float));
        assert_memory_equal(&y3[o][T * N[o]], &y0[o][T * N[o]], GUARD * sizeof(float));
        assert_memory_equal(y1[o], y3[o], (size_t)(T * N[o]) * sizeof(float));
    }
    /* batch invariance: the first row of the last segment alone */
    if (n_seg > 0 && segs[n_seg - 1].n_rows > 0) {
        mn_lora_seg one = segs[n_seg - 1];
        one.n_rows = 1;
        mn_lora_desc d1 = d;
        d1.n_seg = 1;
        d1.seg = &one;
        int64_t t = perm[one.start];
        for (int o = 0; o < n_out; o++) {
            memcpy(yr[o], y0[o], (size_t)(T * N[o]) * sizeof(float));
            d1.y[o] = yr[o];
        }
        run_cpu(&d1, 2);
        for (int o = 0; o < n_out; o++)
            assert_memory_equal(&yr[o][t * N[o]], &y1[o][t * N[o]], (size_t)N[o] * sizeof(float));
    }
    printf("  %-28s T=%-3lld K=%-4lld outs=%d segs=%d  worst err/bound %.3f\n", name, (long long)T, (long long)K, n_out, n_seg,
           worst);
    for (int s = 0; s < n_seg; s++) free(arena[s]);
    for (int o = 0; o < n_out; o++) {
        free(y0[o]); free(yr[o]); free(y1[o]); free(y3[o]);
    }
    free(adapted);
    free(perm);
    free(x);
}

static void test_lora_op(void **state) {
    /* Q/K/V group: 3 outputs, ranks 4/8/16/64 per adapter, K/V with their own ranks */
    const int64_t N3[3] = {96, 32, 32};
    const seg_spec qkv[4] = {{{4, 4, 4}, 3}, {{8, 8, 0}, 1}, {{16, 16, 16}, 5}, {{64, 32, 8}, 2}};
    run_case("qkv mixed ranks + none", 17, 96, 3, N3, qkv, 4, 1);
    /* o / down: one output, odd K and N, rows of no adapter in between */
    const int64_t N1[1] = {77};
    const seg_spec one[4] = {{{4}, 2}, {{64}, 4}, {{8}, 1}, {{16}, 3}};
    run_case("single output, odd sizes", 13, 131, 1, N1, one, 4, 2);
    /* gate/up: decode-like, one row per adapter */
    const int64_t N2[2] = {160, 160};
    const seg_spec gu[4] = {{{16, 16}, 1}, {{16, 16}, 1}, {{4, 8}, 1}, {{64, 64}, 1}};
    run_case("gate/up, one row each", 6, 64, 2, N2, gu, 4, 3);
    /* prefill-like: one adapter over many rows */
    const seg_spec big[1] = {{{16, 8, 8}, 40}};
    run_case("one adapter, 40 rows", 48, 96, 3, N3, big, 1, 4);
    /* nothing adapted: nothing changes */
    run_case("no segments", 5, 96, 3, N3, NULL, 0, 5);
}

int main(void) {
    mn_cpu_init();
    best_simd = mn_cpu_simd_name();
    printf("cpu lora at levels scalar and %s\n", best_simd);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lora_op),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
