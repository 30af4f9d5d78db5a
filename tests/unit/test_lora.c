/* tests/unit/test_lora.c — the batched LoRA op: CPU against the reference.
 *
 * Cases mix segments of ranks 4, 8, 16 and 64 (one of them a Q/K/V-style group with three
 * outputs of different ranks sharing one shrink, one where an output is not adapted),
 * rows scattered through the batch and rows with no adapter; segments stored as F32, F16
 * and BF16 in the same call. Checked:
 *   - |y - ref| <= 1e-4 * (|y_in| + |s| * sum_j (sum_k |x_k a_jk|) |b_nj|) (the contract),
 *     computed here from the inputs; NaN or inf fails;
 *   - rows in no segment keep their exact bytes, and so do guard floats after each output;
 *   - at every SIMD level the CPU has (scalar, avx2, avx512, avx512-vnni): 1 and 3 threads
 *     give the same bits, and a row computed alone (one segment of one row) the same bits
 *     as inside the batch (batch invariance); scalar and AVX2 give the same bits (one lane
 *     order), avx512-vnni avx512's (one compilation); AVX-512 (16 lanes, fma) may differ
 *     from scalar within the bound above;
 *   - strided views of a wider A / B^T (a_ld, b_ld: tensor-parallel shards) give the bits of
 *     dense copies, and split shrink / expand phases the bits of the fused op.
 * And through the forward pass of the real model (SmolLM2, as test_forward.c) with a small
 * adapter this file writes (rank 2 on q_proj, rank 3 on down_proj):
 *   - rows without an adapter in a mixed batch give the bits of a batch without adapters;
 *   - a sequence with the adapter gives the same bits alone and in a mixed batch, and
 *     different logits from the base model;
 *   - bad adapter indices are refused with nothing computed; the registry refuses a
 *     duplicate name and an unknown one; a load whose N-th allocation fails leaks nothing;
 *   - an adapter parsed on another thread (mn_lora_load) installs with mn_lora_registry_add;
 *     refused adds leave it with the caller and the registry unchanged.
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

#include <unistd.h>

#include "engine/alloc.h"
#include "engine/forward.h"
#include "engine/lora.h"
#include "kernels/ops.h"
#include "tests/unit/test_model.h"

#define GUARD 16

static uint32_t rng_state;
static const char *best_simd;
/* the levels of kernels/cpu/cpu.c, lowest first; those the CPU lacks are skipped */
static const char *const LEVELS[4] = {"scalar", "avx2", "avx512", "avx512-vnni"};
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
    uint16_t *arena16[8] = {0};
    const float *fa[8], *fb[8][MN_LORA_MAX_OUT];   /* the values as f32, for the bound */
    static const mn_dtype types[3] = {MN_F32, MN_F16, MN_BF16};
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
        /* segments cycle through F32, F16 and BF16 storage: values rounded to the type, and
         * for 16-bit types a and b point into a 16-bit copy */
        g->type = types[(s + seed) % 3];
        fa[s] = g->a;
        for (int o = 0; o < n_out; o++) fb[s][o] = g->b[o];
        if (g->type != MN_F32) {
            arena16[s] = malloc(nf * sizeof(uint16_t));
            for (size_t i = 0; i < nf; i++) {
                uint16_t h = g->type == MN_F16 ? mn_fp32_to_fp16(arena[s][i]) : mn_fp32_to_bf16(arena[s][i]);
                arena16[s][i] = h;
                arena[s][i] = g->type == MN_F16 ? mn_fp16_to_fp32(h) : mn_bf16_to_fp32(h);
            }
            g->a = arena16[s];
            for (int o = 0; o < n_out; o++)
                if (g->b[o]) g->b[o] = arena16[s] + (fb[s][o] - arena[s]);
        }
    }
    assert_true(at <= T);
    mn_lora_desc d = {.K = K, .x = x, .x_stride = K, .n_out = n_out, .n_seg = n_seg, .seg = segs, .rows = perm};
    for (int o = 0; o < n_out; o++) {
        d.N[o] = N[o];
        d.y_stride[o] = N[o];
    }
    for (int o = 0; o < n_out; o++) {
        memcpy(yr[o], y0[o], (size_t)(T * N[o] + GUARD) * sizeof(float));
        d.y[o] = yr[o];
    }
    mn_ref_lora(&d);
    /* the bound per element, from the inputs */
    char *adapted = calloc((size_t)T, 1);
    double *mag[MN_LORA_MAX_OUT];
    for (int o = 0; o < n_out; o++) {
        mag[o] = malloc((size_t)(T * N[o]) * sizeof(double));
        for (int64_t i = 0; i < T * N[o]; i++) mag[o][i] = 0;
    }
    for (int s = 0; s < n_seg; s++) {
        const mn_lora_seg *g = &segs[s];
        for (int32_t i = 0; i < g->n_rows; i++) {
            int64_t t = perm[g->start + i];
            adapted[t] = 1;
            double absv[256];
            for (int32_t j = 0; j < g->r; j++) {
                absv[j] = 0;
                for (int64_t k = 0; k < K; k++) absv[j] += fabs((double)x[t * K + k] * fa[s][j * K + k]);
            }
            for (int o = 0; o < n_out; o++)
                for (int64_t n = 0; n < N[o]; n++) {
                    double m = fabs(y0[o][t * N[o] + n]);
                    for (int32_t j = 0; g->b[o] && j < g->r_out[o]; j++)
                        m += fabs(g->scale[o]) * absv[g->r_off[o] + j] * fabs(fb[s][o][j * N[o] + n]);
                    mag[o][t * N[o] + n] = m;
                }
        }
    }
    /* every SIMD level the CPU has: 1 thread within the bound of ref, 3 threads the same
     * bits; scalar and AVX2 the same bits (one lane order), avx512-vnni avx512's (one
     * compilation) */
    float *ylv[4][MN_LORA_MAX_OUT] = {{0}};
    double worst = 0;
    for (int lv = 0; lv < 4; lv++) {
        if (!mn_cpu_set_simd(LEVELS[lv])) continue;
        for (int o = 0; o < n_out; o++) {
            memcpy(y1[o], y0[o], (size_t)(T * N[o] + GUARD) * sizeof(float));
            memcpy(y3[o], y0[o], (size_t)(T * N[o] + GUARD) * sizeof(float));
        }
        for (int o = 0; o < n_out; o++) d.y[o] = y1[o];
        run_cpu(&d, 1);
        for (int o = 0; o < n_out; o++) d.y[o] = y3[o];
        run_cpu(&d, 3);
        for (int o = 0; o < n_out; o++) {
            for (int64_t t = 0; t < T; t++) {
                if (!adapted[t]) {
                    assert_memory_equal(&y1[o][t * N[o]], &y0[o][t * N[o]], (size_t)N[o] * sizeof(float));
                    assert_memory_equal(&yr[o][t * N[o]], &y0[o][t * N[o]], (size_t)N[o] * sizeof(float));
                    continue;
                }
                for (int64_t n = 0; n < N[o]; n++) {
                    float got = y1[o][t * N[o] + n], want = yr[o][t * N[o] + n];
                    double bound = 1e-4 * mag[o][t * N[o] + n];
                    if (!isfinite(got))
                        fail_msg("%s, %s: out %d row %lld col %lld: not finite", name, LEVELS[lv], o, (long long)t, (long long)n);
                    double err = fabs((double)got - want);
                    if (err > bound)
                        fail_msg("%s, %s: out %d row %lld col %lld: %.9g vs ref %.9g (bound %.3g)", name, LEVELS[lv], o,
                                 (long long)t, (long long)n, got, want, bound);
                    if (err / bound > worst) worst = err / bound;
                }
            }
            assert_memory_equal(&y1[o][T * N[o]], &y0[o][T * N[o]], GUARD * sizeof(float));
            assert_memory_equal(&y3[o][T * N[o]], &y0[o][T * N[o]], GUARD * sizeof(float));
            if (memcmp(y1[o], y3[o], (size_t)(T * N[o]) * sizeof(float)) != 0)
                fail_msg("%s, %s: out %d: 3 threads differ from 1", name, LEVELS[lv], o);
            ylv[lv][o] = malloc((size_t)(T * N[o]) * sizeof(float));
            memcpy(ylv[lv][o], y1[o], (size_t)(T * N[o]) * sizeof(float));
        }
        /* batch invariance: the first row of the last segment alone, at this level */
        if (n_seg > 0 && segs[n_seg - 1].n_rows > 0) {
            mn_lora_seg one = segs[n_seg - 1];
            one.n_rows = 1;
            mn_lora_desc d1 = d;
            d1.n_seg = 1;
            d1.seg = &one;
            int64_t t = perm[one.start];
            for (int o = 0; o < n_out; o++) {
                memcpy(y3[o], y0[o], (size_t)(T * N[o]) * sizeof(float));
                d1.y[o] = y3[o];
            }
            run_cpu(&d1, 2);
            for (int o = 0; o < n_out; o++)
                if (memcmp(&y3[o][t * N[o]], &y1[o][t * N[o]], (size_t)N[o] * sizeof(float)) != 0)
                    fail_msg("%s, %s: out %d: a row alone differs from the row in the batch", name, LEVELS[lv], o);
        }
    }
    for (int o = 0; o < n_out; o++) {
        const size_t yb = (size_t)(T * N[o]) * sizeof(float);
        if (ylv[1][o] && memcmp(ylv[0][o], ylv[1][o], yb) != 0) fail_msg("%s: out %d: avx2 differs from scalar", name, o);
        if (ylv[3][o] && memcmp(ylv[2][o], ylv[3][o], yb) != 0)
            fail_msg("%s: out %d: avx512-vnni differs from avx512", name, o);
        for (int lv = 0; lv < 4; lv++) free(ylv[lv][o]);
        free(mag[o]);
    }
    assert_true(mn_cpu_set_simd(best_simd));
    printf("  %-28s T=%-3lld K=%-4lld outs=%d segs=%d  worst err/bound %.3f\n", name, (long long)T, (long long)K, n_out, n_seg,
           worst);
    for (int s = 0; s < n_seg; s++) free(arena[s]), free(arena16[s]);
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

/* The row-blocked path (one segment of every row: a single-adapter batch) gives the bits
 * of the per-row path, which the same rows split into segments of 3 rows of the same
 * adapter take; every type, every SIMD level, 1 and 2 threads, segments of 41, 13 and 6
 * rows (blocks of 4 with tails of 1 and 2 rows), K with a tail. */
static void test_lora_single_path(void **state) {
    enum { T = 41, K = 150, N = 100, R = 16 };
    const mn_dtype types[3] = {MN_F32, MN_F16, MN_BF16};
    rng_state = 77;
    float *x = malloc(T * K * sizeof(float)), *y1 = malloc(T * N * sizeof(float)), *y2 = malloc(T * N * sizeof(float));
    float *y0 = malloc(T * N * sizeof(float)), *a = malloc(R * K * sizeof(float)), *b = malloc(R * N * sizeof(float));
    uint16_t *a16 = malloc(R * K * 2), *b16 = malloc(R * N * 2);
    int32_t rows[T];
    for (int i = 0; i < T * K; i++) x[i] = frand();
    for (int i = 0; i < T * N; i++) y0[i] = frand();
    for (int i = 0; i < R * K; i++) a[i] = frand() * 0.3f;
    for (int i = 0; i < R * N; i++) b[i] = frand() * 0.3f;
    for (int i = 0; i < T; i++) rows[i] = (i * 17) % T;   /* a permutation: 17 and 41 are coprime */
    for (int ty = 0; ty < 3; ty++) {
        const void *pa = a, *pb = b;
        if (types[ty] != MN_F32) {
            for (int i = 0; i < R * K; i++) a16[i] = types[ty] == MN_F16 ? mn_fp32_to_fp16(a[i]) : mn_fp32_to_bf16(a[i]);
            for (int i = 0; i < R * N; i++) b16[i] = types[ty] == MN_F16 ? mn_fp32_to_fp16(b[i]) : mn_fp32_to_bf16(b[i]);
            pa = a16, pb = b16;
        }
        /* segments of 41 and 13 rows (blocks of 4 and a tail row) and 6 (4 + 2) */
        static const int sizes[3] = {T, 13, 6};
        for (int si = 0; si < 3; si++) {
            const int Tn = sizes[si];
            mn_lora_seg one = {.start = 0, .n_rows = Tn, .r = R, .type = types[ty], .a = pa, .b = {pb}, .r_out = {R},
                               .scale = {1.5f}};
            mn_lora_seg three[(T + 2) / 3];
            for (int k = 0; k < (Tn + 2) / 3; k++) {
                three[k] = one;
                three[k].start = 3 * k;
                three[k].n_rows = Tn - 3 * k < 3 ? Tn - 3 * k : 3;
            }
            mn_lora_desc d1 = {.K = K, .x = x, .x_stride = K, .n_out = 1, .N = {N}, .y = {y1}, .y_stride = {N},
                               .n_seg = 1, .seg = &one, .rows = rows};
            mn_lora_desc d2 = d1;
            d2.y[0] = y2, d2.n_seg = (Tn + 2) / 3, d2.seg = three;
            for (int lv = 0; lv < 4; lv++)
                for (int nth = 1; nth <= 2; nth++) {
                    if (!mn_cpu_set_simd(LEVELS[lv])) continue;
                    memcpy(y1, y0, T * N * sizeof(float));
                    memcpy(y2, y0, T * N * sizeof(float));
                    run_cpu(&d1, nth);
                    run_cpu(&d2, nth);
                    assert_memory_equal(y1, y2, T * N * sizeof(float));
                    assert_memory_not_equal(y1, y0, T * N * sizeof(float));
                }
        }
    }
    assert_true(mn_cpu_set_simd(best_simd));
    free(x), free(y0), free(y1), free(y2), free(a), free(b), free(a16), free(b16);
}

/* Tensor-parallel views and split phases (kernels/ops.h: a_ld, b_ld, phase, v). A wide
 * adapter (A [r, KF], B^T [r, NF]) is read through a window of input features [k0, k0 + K)
 * and output features [n0, n0 + N) with the full row strides; the same op on dense copies
 * of those windows must give the same bits (ref and cpu, scalar and SIMD, 1 and 3
 * threads: only addresses change). SHRINK then EXPAND must give the fused op's bits and
 * SHRINK alone must leave y untouched; v written by the ref shrink equals the cpu's. Two
 * segments of different rank and type, one with two rows (blocked path below 4: per row)
 * and one with five (blocked). */
static void test_lora_views_phases(void **state) {
    (void)state;
    enum { T = 9, KF = 70, NF = 90, K = 33, N = 41, K0 = 21, N0 = 37 };
    const int32_t R[2] = {3, 12}, nrows[2] = {2, 5};
    const mn_dtype types[2] = {MN_F16, MN_F32};
    rng_state = 4242;
    float *x = malloc(T * K * sizeof(float)), *y0 = malloc((T * N + GUARD) * sizeof(float));
    for (int i = 0; i < T * K; i++) x[i] = frand();
    for (int i = 0; i < T * N + GUARD; i++) y0[i] = frand();
    int32_t rows[7] = {8, 1, 4, 0, 6, 2, 5};
    void *wide_a[2], *wide_b[2], *dense_a[2], *dense_b[2];
    mn_lora_seg sv[2], sd[2];
    for (int s = 0; s < 2; s++) {
        const int64_t esz = types[s] == MN_F32 ? 4 : 2;
        wide_a[s] = malloc((size_t)(R[s] * KF * esz));
        wide_b[s] = malloc((size_t)(R[s] * NF * esz));
        dense_a[s] = malloc((size_t)(R[s] * K * esz));
        dense_b[s] = malloc((size_t)(R[s] * N * esz));
        for (int64_t i = 0; i < R[s] * KF; i++) {
            float v = frand() * 0.3f;
            if (esz == 4) ((float *)wide_a[s])[i] = v;
            else ((uint16_t *)wide_a[s])[i] = mn_fp32_to_fp16(v);
        }
        for (int64_t i = 0; i < R[s] * NF; i++) {
            float v = frand() * 0.3f;
            if (esz == 4) ((float *)wide_b[s])[i] = v;
            else ((uint16_t *)wide_b[s])[i] = mn_fp32_to_fp16(v);
        }
        for (int j = 0; j < R[s]; j++) {
            memcpy((char *)dense_a[s] + j * K * esz, (char *)wide_a[s] + (j * KF + K0) * esz, (size_t)(K * esz));
            memcpy((char *)dense_b[s] + j * N * esz, (char *)wide_b[s] + (j * NF + N0) * esz, (size_t)(N * esz));
        }
        sd[s] = (mn_lora_seg){.start = s ? nrows[0] : 0, .n_rows = nrows[s], .r = R[s], .type = types[s], .a = dense_a[s],
                              .b = {dense_b[s]}, .r_out = {R[s]}, .scale = {0.75f + (float)s}};
        sv[s] = sd[s];
        sv[s].a = (char *)wide_a[s] + K0 * esz;
        sv[s].b[0] = (char *)wide_b[s] + N0 * esz;
    }
    mn_lora_desc dd = {.K = K, .x = x, .x_stride = K, .n_out = 1, .N = {N}, .y_stride = {N}, .n_seg = 2, .seg = sd,
                       .rows = rows};
    mn_lora_desc dv = dd;
    dv.seg = sv;
    dv.a_ld = KF;
    dv.b_ld[0] = NF;
    const int64_t nv = mn_lora_v_floats(sv, 2);
    assert_int_equal(nv, 2 * 3 + 5 * 12);
    float *want = malloc((T * N + GUARD) * sizeof(float)), *got = malloc((T * N + GUARD) * sizeof(float));
    float *v = malloc((size_t)nv * sizeof(float)), *v_ref = malloc((size_t)nv * sizeof(float));
    const size_t yb = (T * N + GUARD) * sizeof(float);
    /* ref: view == dense, split == fused */
    memcpy(want, y0, yb);
    dd.y[0] = want;
    mn_ref_lora(&dd);
    memcpy(got, y0, yb);
    dv.y[0] = got;
    mn_ref_lora(&dv);
    assert_memory_equal(got, want, yb);
    memcpy(got, y0, yb);
    dv.v = v_ref;
    dv.phase = MN_LORA_SHRINK;
    mn_ref_lora(&dv);
    assert_memory_equal(got, y0, yb);
    dv.phase = MN_LORA_EXPAND;
    mn_ref_lora(&dv);
    assert_memory_equal(got, want, yb);
    /* cpu: every SIMD level and thread count */
    for (int lv = 0; lv < 4; lv++)
        for (int nth = 1; nth <= 3; nth += 2) {
            if (!mn_cpu_set_simd(LEVELS[lv])) continue;
            memcpy(want, y0, yb);
            dd.y[0] = want;
            run_cpu(&dd, nth);
            memcpy(got, y0, yb);
            dv.phase = MN_LORA_FUSED;
            dv.v = NULL;
            run_cpu(&dv, nth);
            if (memcmp(got, want, yb) != 0) fail_msg("%s, %d threads: strided views differ from dense copies", LEVELS[lv], nth);
            memcpy(got, y0, yb);
            dv.phase = MN_LORA_SHRINK;
            dv.v = v;
            assert_int_equal(mn_cpu_lora_work_bytes(&dv), 0);
            run_cpu(&dv, nth);
            assert_memory_equal(got, y0, yb);
            for (int64_t i = 0; i < nv; i++)
                if (fabsf(v[i] - v_ref[i]) > 1e-5f * (1.0f + fabsf(v_ref[i])))
                    fail_msg("%s: shrink v[%lld] = %g, ref %g", LEVELS[lv], (long long)i, v[i], v_ref[i]);
            dv.phase = MN_LORA_EXPAND;
            run_cpu(&dv, nth);
            if (memcmp(got, want, yb) != 0) fail_msg("%s, %d threads: shrink + expand differ from the fused op", LEVELS[lv], nth);
        }
    assert_true(mn_cpu_set_simd(best_simd));
    for (int s = 0; s < 2; s++) {
        free(wide_a[s]);
        free(wide_b[s]);
        free(dense_a[s]);
        free(dense_b[s]);
    }
    free(x);
    free(y0);
    free(want);
    free(got);
    free(v);
    free(v_ref);
}

/* ---- through the forward pass ---- */
static const char *model_path(void) { return mn_test_model_path(); }

/* Write a PEFT directory: q_proj rank 2 and down_proj rank 3 on every layer, F32. */
static void write_adapter(const char *dir, const mn_model_config *c, uint32_t seed) {
    char path[4200];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 8, \"target_modules\": [\"q_proj\", \"down_proj\"],"
               " \"rank_pattern\": {\"down_proj\": 3}}");
    fclose(f);
    const int64_t E = c->n_embd, Q = (int64_t)c->n_head * c->head_dim, F = c->n_ff;
    size_t cap = (size_t)c->n_layer * 4 * 200 + 64, hl = 0;
    char *hdr = malloc(cap);
    uint64_t off = 0;
    hl += (size_t)snprintf(hdr + hl, cap - hl, "{");
    for (int32_t l = 0; l < c->n_layer; l++) {
        const char *mod[2] = {"self_attn.q_proj", "mlp.down_proj"};
        int64_t r[2] = {2, 3}, in[2] = {E, F}, out[2] = {Q, E};
        for (int t = 0; t < 2; t++)
            for (int ab = 0; ab < 2; ab++) {
                int64_t d0 = ab ? out[t] : r[t], d1 = ab ? r[t] : in[t];
                uint64_t n = (uint64_t)(d0 * d1) * 4;
                hl += (size_t)snprintf(hdr + hl, cap - hl,
                                       "%s\"base_model.model.model.layers.%d.%s.lora_%c.weight\":{\"dtype\":\"F32\","
                                       "\"shape\":[%lld,%lld],\"data_offsets\":[%llu,%llu]}",
                                       hl > 1 ? "," : "", l, mod[t], ab ? 'B' : 'A', (long long)d0, (long long)d1,
                                       (unsigned long long)off, (unsigned long long)(off + n));
                off += n;
            }
    }
    hl += (size_t)snprintf(hdr + hl, cap - hl, "}");
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    f = fopen(path, "wb");
    assert_non_null(f);
    uint64_t h64 = hl;
    fwrite(&h64, 8, 1, f);
    fwrite(hdr, 1, hl, f);
    rng_state = seed;
    for (uint64_t i = 0; i < off / 4; i++) {
        float v = frand() * 0.05f;
        fwrite(&v, 4, 1, f);
    }
    fclose(f);
    free(hdr);
}

typedef struct fwd_fixture {
    mn_backend *be;
    mn_model *m;
    mn_kv_pool *kv;
    mn_forward *f;
    char dir[64];
} fwd_fixture;

static int fwd_open(fwd_fixture *fx) {
    mn_errbuf eb = {{0}};
    memset(fx, 0, sizeof *fx);
    mn_backend_params bp = {.device = "cpu", .n_threads = 2};
    if (mn_backend_cpu_new(&bp, &fx->be, &eb) != MN_OK) return -1;
    if (mn_model_load(model_path(), fx->be, NULL, &fx->m, &eb) != MN_OK) {
        fprintf(stderr, "cannot load the default model %s: %s (run tools/setup.sh)\n", model_path(), eb.msg);
        mn_backend_free(fx->be);
        return -1;
    }
    const mn_model_config *c = &fx->m->cfg;
    assert_int_equal(mn_kv_pool_new(fx->be, c->n_layer, c->n_kv_head, c->head_dim, 16, 64, &fx->kv, &eb), MN_OK);
    assert_int_equal(mn_forward_new(fx->m, fx->kv, &fx->f, &eb), MN_OK);
    snprintf(fx->dir, sizeof fx->dir, "/tmp/mn_lora_test_XXXXXX");
    assert_non_null(mkdtemp(fx->dir));
    write_adapter(fx->dir, c, 99);
    return 0;
}

/* fwd_open, or skip the test when the model is missing and MNEME_ALLOW_NO_MODEL=1. */
static void fwd_open_or_skip(fwd_fixture *fx) {
    const char *allow = getenv("MNEME_ALLOW_NO_MODEL");
    if (access(model_path(), R_OK) != 0 && allow && !strcmp(allow, "1")) {
        fprintf(stderr, "model %s missing and MNEME_ALLOW_NO_MODEL=1: skipping\n", model_path());
        skip();
    }
    if (fwd_open(fx)) fail_msg("model missing");
}

static void fwd_close(fwd_fixture *fx) {
    char p[200];
    snprintf(p, sizeof p, "%s/adapter_config.json", fx->dir);
    unlink(p);
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", fx->dir);
    unlink(p);
    rmdir(fx->dir);
    mn_forward_free(fx->f);
    mn_kv_pool_free(fx->kv);
    mn_model_free(fx->m);
    mn_backend_free(fx->be);
}

#define NS 3
#define LEN 5
/* Run NS sequences of LEN tokens in one interleaved batch with adapters ad[s] (NULL: no
 * lora struct at all); logits out[s][LEN][V]. */
static mn_err run_batch(fwd_fixture *fx, const int32_t *ad, const mn_lora *const *table, int32_t n_tab, float *out,
                        mn_errbuf *eb) {
    int32_t tok[NS * LEN], sq[NS * LEN], pos[NS * LEN], adr[NS * LEN], rows[NS * LEN];
    int n = 0;
    for (int p = 0; p < LEN; p++)
        for (int s = 0; s < NS; s++) {
            tok[n] = (s * 977 + p * 131 + 5) % fx->m->cfg.n_vocab, sq[n] = s, pos[n] = p, adr[n] = ad ? ad[s] : -1;
            n++;
        }
    for (int s = 0, k = 0; s < NS; s++)
        for (int p = 0; p < LEN; p++) rows[k++] = p * NS + s;
    mn_kv_seq seqv[NS] = {{0}};
    mn_kv_seq *seqs[NS] = {&seqv[0], &seqv[1], &seqv[2]};
    mn_batch b = {.n_tokens = n, .tokens = tok, .seq = sq, .pos = pos, .n_out = n, .out_rows = rows};
    mn_batch_lora lb = {.adapter = adr, .adapters = table, .n_adapters = n_tab};
    mn_err e = mn_forward_run_lora(fx->f, seqs, NS, &b, ad ? &lb : NULL, out, eb);
    for (int s = 0; s < NS; s++) {
        if (e != MN_OK) assert_int_equal(seqv[s].n_tokens, 0);   /* refused: nothing computed */
        mn_kv_seq_release(fx->kv, &seqv[s]);
    }
    return e;
}

static void test_lora_forward(void **state) {
    fwd_fixture fx;
    fwd_open_or_skip(&fx);
    mn_errbuf eb = {{0}};
    mn_lora_registry *reg;
    assert_int_equal(mn_lora_registry_new(fx.m, &reg, &eb), MN_OK);
    int32_t idx = -1;
    if (mn_lora_registry_load(reg, "persona", fx.dir, &idx, &eb) != MN_OK) fail_msg("%s", eb.msg);
    assert_int_equal(idx, 0);
    assert_int_equal(mn_lora_registry_find(reg, "persona"), 0);
    assert_int_equal(mn_lora_registry_find(reg, "other"), -1);
    assert_int_equal(mn_lora_registry_load(reg, "persona", fx.dir, NULL, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "already loaded"));
    assert_int_equal(mn_lora_registry_unload(reg, "other", &eb), MN_ENOT_FOUND);
    int32_t n_tab;
    const mn_lora *const *tab = mn_lora_registry_table(reg, &n_tab);
    assert_int_equal(n_tab, 1);
    assert_int_equal(tab[0]->layers[0].t[MN_LORA_Q].r, 2);
    assert_int_equal(tab[0]->layers[0].t[MN_LORA_DOWN].r, 3);
    assert_true(tab[0]->layers[0].t[MN_LORA_DOWN].scale == 8.0f / 3.0f);
    assert_int_equal(tab[0]->layers[0].t[MN_LORA_K].r, 0);

    const size_t V = (size_t)fx.m->cfg.n_vocab, per = LEN * V;
    float *base = malloc(NS * per * sizeof(float)), *mixed = malloc(NS * per * sizeof(float));
    float *alone = malloc(NS * per * sizeof(float));
    if (run_batch(&fx, NULL, NULL, 0, base, &eb) != MN_OK) fail_msg("%s", eb.msg);
    const int32_t mix[NS] = {-1, 0, -1}, all[NS] = {0, 0, 0};
    if (run_batch(&fx, mix, tab, n_tab, mixed, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (run_batch(&fx, all, tab, n_tab, alone, &eb) != MN_OK) fail_msg("%s", eb.msg);
    /* sequences 0 and 2 have no adapter: the bits of the plain batch */
    assert_memory_equal(mixed, base, per * sizeof(float));
    assert_memory_equal(mixed + 2 * per, base + 2 * per, per * sizeof(float));
    /* sequence 1: the same bits whatever else is in the batch, and not the base logits */
    assert_memory_equal(mixed + per, alone + per, per * sizeof(float));
    double diff = 0;
    for (size_t i = 0; i < per; i++) diff = fmax(diff, fabs((double)mixed[per + i] - base[per + i]));
    printf("  forward: adapter moves the logits by up to %.3g\n", diff);
    assert_true(diff > 1e-3);

    /* bad adapter fields: refused, nothing computed */
    const int32_t bad_idx[NS] = {0, 1, -1}, bad_neg[NS] = {-2, 0, 0};
    assert_int_equal(run_batch(&fx, bad_idx, tab, n_tab, mixed, &eb), MN_ERANGE);
    assert_non_null(strstr(eb.msg, "adapter 1 not in [-1, 1)"));
    assert_int_equal(run_batch(&fx, bad_neg, tab, n_tab, mixed, &eb), MN_ERANGE);
    const mn_lora *holes[2] = {tab[0], NULL};
    const int32_t to_hole[NS] = {0, 1, 0};
    assert_int_equal(run_batch(&fx, to_hole, holes, 2, mixed, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "adapter 1 is not loaded"));

    assert_int_equal(mn_lora_registry_unload(reg, "persona", &eb), MN_OK);
    assert_int_equal(mn_lora_registry_find(reg, "persona"), -1);
    mn_lora_registry_free(reg);

    /* the N-th allocation of a load fails: an error each time, nothing leaked */
    long live = mn_alloc_live();
    for (long k = 0;; k++) {
        mn_lora *l = NULL;
        mn_alloc_fail_after(k);
        mn_err e = mn_lora_load(fx.dir, "x", fx.m, &l, &eb);
        mn_alloc_fail_after(-1);
        if (e == MN_OK) {
            mn_lora_free(l);
            break;
        }
        assert_int_equal(e, MN_ENOMEM);
        assert_null(l);
        assert_int_equal(mn_alloc_live(), live);
    }
    free(base), free(mixed), free(alone);
    fwd_close(&fx);
}

/* ---- parse off-thread, install on the owner's thread (mn_lora_load + mn_lora_registry_add) ----
 * What `mneme serve` does: the files are read on a worker thread, the registry only installs
 * the result. Checked: an adapter loaded on another thread installs and equals one the
 * registry loads itself (fingerprint, shapes); a refused add (duplicate name, other model
 * shape) leaves the adapter with the caller and the registry unchanged; an add whose slot
 * allocation fails leaks nothing and changes nothing. */
typedef struct load_arg {
    const char *dir;
    const mn_model *m;
    mn_lora *out;
    mn_err err;
    mn_errbuf eb;
} load_arg;

static void *load_thread(void *p) {
    load_arg *a = p;
    a->err = mn_lora_load(a->dir, "parsed", a->m, &a->out, &a->eb);
    return NULL;
}

static void test_lora_registry_add(void **state) {
    fwd_fixture fx;
    fwd_open_or_skip(&fx);
    mn_errbuf eb = {{0}};
    mn_lora_registry *reg;
    assert_int_equal(mn_lora_registry_new(fx.m, &reg, &eb), MN_OK);
    int32_t idx = -1;
    if (mn_lora_registry_load(reg, "direct", fx.dir, &idx, &eb) != MN_OK) fail_msg("%s", eb.msg);
    assert_int_equal(idx, 0);

    load_arg a = {.dir = fx.dir, .m = fx.m};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, load_thread, &a), 0);
    assert_int_equal(pthread_join(th, NULL), 0);
    if (a.err != MN_OK) fail_msg("%s", a.eb.msg);
    assert_int_equal(mn_lora_registry_n_slots(reg), 1);   /* loading touched no registry */
    if (mn_lora_registry_add(reg, a.out, &idx, &eb) != MN_OK) fail_msg("%s", eb.msg);
    assert_int_equal(idx, 1);
    assert_int_equal(mn_lora_registry_find(reg, "parsed"), 1);
    const mn_lora *d = mn_lora_registry_adapter(reg, 0), *p = mn_lora_registry_adapter(reg, 1);
    assert_ptr_equal(p, a.out);   /* installed as is: nothing re-read or copied */
    assert_memory_equal(d->fingerprint, p->fingerprint, 16);
    assert_int_equal(d->bytes, p->bytes);
    assert_int_equal(d->targets, p->targets);

    /* a duplicate name: refused, the adapter stays the caller's, the registry unchanged */
    mn_lora *dup = NULL;
    if (mn_lora_load(fx.dir, "parsed", fx.m, &dup, &eb) != MN_OK) fail_msg("%s", eb.msg);
    assert_int_equal(mn_lora_registry_add(reg, dup, &idx, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "'parsed' is already loaded"));
    assert_int_equal(mn_lora_registry_n_slots(reg), 2);
    assert_ptr_equal(mn_lora_registry_adapter(reg, 1), a.out);

    /* made for a model of another shape */
    snprintf(dup->name, sizeof dup->name, "other-shape");
    dup->n_layer++;
    assert_int_equal(mn_lora_registry_add(reg, dup, NULL, &eb), MN_EMISMATCH);
    assert_non_null(strstr(eb.msg, "other-shape"));
    assert_int_equal(mn_lora_registry_find(reg, "other-shape"), -1);
    dup->n_layer--;

    /* the slot table cannot grow: an error, nothing installed, nothing leaked */
    long live = mn_alloc_live();
    for (long k = 0;; k++) {
        mn_alloc_fail_after(k);
        mn_err e = mn_lora_registry_add(reg, dup, &idx, &eb);
        mn_alloc_fail_after(-1);
        if (e == MN_OK) break;
        assert_int_equal(e, MN_ENOMEM);
        assert_int_equal(mn_lora_registry_find(reg, "other-shape"), -1);
        assert_int_equal(mn_alloc_live(), live);
    }
    assert_int_equal(mn_lora_registry_find(reg, "other-shape"), idx);
    assert_int_equal(mn_lora_registry_unload(reg, "parsed", &eb), MN_OK);
    assert_int_equal(mn_lora_registry_find(reg, "parsed"), -1);
    mn_lora_registry_free(reg);   /* frees "direct" and "other-shape" */
    fwd_close(&fx);
}

/* ---- residency: a device budget, LRU paging, pinning ----
 * Four adapters (different weights, same shapes: the same bytes each) in four directories.
 * The same steps run once reading the host copies and once through the registry's device
 * copies under a budget that holds fewer adapters than the steps use, so adapters are
 * evicted and paged in again between steps: the logits must keep their bits. */
#define NA 4
#define STEPS 6

static void rm_adapter(const char *dir) {
    char p[320];
    snprintf(p, sizeof p, "%s/adapter_config.json", dir);
    unlink(p);
    snprintf(p, sizeof p, "%s/adapter_model.safetensors", dir);
    unlink(p);
    rmdir(dir);
}

/* Step k of a schedule: sequence adapters ad[3]. "pairs": two adapters per batch plus a
 * sequence without one; "single": one adapter for the whole batch. */
static void step_adapters(int k, bool pairs, int32_t ad[NS]) {
    ad[0] = k % NA;
    ad[1] = pairs ? (k + 1) % NA : k % NA;
    ad[2] = pairs ? -1 : k % NA;
}

/* Run the schedule through the registry (acquire / run / release per step). */
static void run_schedule(fwd_fixture *fx, mn_lora_registry *reg, bool pairs, float *out, size_t per) {
    mn_errbuf eb = {{0}};
    for (int k = 0; k < STEPS; k++) {
        int32_t ad[NS], tok_ad[NS * LEN];
        step_adapters(k, pairs, ad);
        for (int i = 0; i < NS * LEN; i++) tok_ad[i] = ad[i % NS];   /* run_batch interleaves the sequences */
        const mn_lora *const *tab;
        int32_t n_tab;
        if (mn_lora_registry_acquire_batch(reg, tok_ad, NS * LEN, &tab, &n_tab, &eb) != MN_OK) fail_msg("%s", eb.msg);
        for (int s = 0; s < NS; s++)
            if (ad[s] >= 0) assert_true(mn_lora_registry_pinned(reg, ad[s]));
        if (run_batch(fx, ad, tab, n_tab, out + (size_t)k * NS * per, &eb) != MN_OK) fail_msg("%s", eb.msg);
        mn_lora_registry_release_batch(reg, tok_ad, NS * LEN);
    }
}

static void test_lora_paging(void **state) {
    fwd_fixture fx;
    fwd_open_or_skip(&fx);
    mn_errbuf eb = {{0}};
    char dirs[NA][64];
    mn_lora_registry *reg;
    assert_int_equal(mn_lora_registry_new(fx.m, &reg, &eb), MN_OK);
    for (int a = 0; a < NA; a++) {
        snprintf(dirs[a], sizeof dirs[a], "/tmp/mn_lora_page_XXXXXX");
        assert_non_null(mkdtemp(dirs[a]));
        write_adapter(dirs[a], &fx.m->cfg, 1000 + (uint32_t)a);
        char name[16];
        snprintf(name, sizeof name, "a%d", a);
        int32_t idx;
        if (mn_lora_registry_load(reg, name, dirs[a], &idx, &eb) != MN_OK) fail_msg("%s", eb.msg);
        assert_int_equal(idx, a);
    }
    int32_t n_tab;
    const mn_lora *const *host_tab = mn_lora_registry_table(reg, &n_tab);
    const size_t one = (size_t)host_tab[0]->bytes, V = (size_t)fx.m->cfg.n_vocab, per = LEN * V;
    float *want = malloc(STEPS * NS * per * sizeof(float)), *got = malloc(STEPS * NS * per * sizeof(float));
    assert_non_null(want), assert_non_null(got);

    for (int sched = 0; sched < 2; sched++) {
        bool pairs = sched == 0;
        /* the reference: host copies, no registry residency */
        for (int k = 0; k < STEPS; k++) {
            int32_t ad[NS];
            step_adapters(k, pairs, ad);
            if (run_batch(&fx, ad, host_tab, n_tab, want + (size_t)k * NS * per, &eb) != MN_OK) fail_msg("%s", eb.msg);
        }
        /* unlimited budget: every adapter paged in once, never evicted */
        assert_int_equal(mn_lora_registry_set_budget(reg, fx.be, 0, &eb), MN_OK);
        mn_lora_stats st0, st;
        mn_lora_registry_stats(reg, &st0);
        run_schedule(&fx, reg, pairs, got, per);
        assert_memory_equal(got, want, STEPS * NS * per * sizeof(float));
        mn_lora_registry_stats(reg, &st);
        assert_int_equal(st.evictions - st0.evictions, 0);
        /* pairs: room for two adapters; single: room for one */
        size_t budget = pairs ? 2 * one : one;
        assert_int_equal(mn_lora_registry_set_budget(reg, fx.be, budget, &eb), MN_OK);
        mn_lora_registry_stats(reg, &st0);
        assert_true(st0.resident_bytes <= budget);
        memset(got, 0, STEPS * NS * per * sizeof(float));
        run_schedule(&fx, reg, pairs, got, per);
        assert_memory_equal(got, want, STEPS * NS * per * sizeof(float));
        mn_lora_registry_stats(reg, &st);
        printf("  paging (%s, budget %zu bytes = %d adapter(s)): %llu page-ins, %llu evictions, %llu bytes, %.3f ms\n",
               pairs ? "two adapters per step" : "one adapter per step", budget, pairs ? 2 : 1,
               (unsigned long long)(st.page_ins - st0.page_ins), (unsigned long long)(st.evictions - st0.evictions),
               (unsigned long long)(st.bytes_in - st0.bytes_in), 1e3 * (st.page_in_seconds - st0.page_in_seconds));
        assert_true(st.page_ins - st0.page_ins >= STEPS);
        assert_true(st.evictions - st0.evictions > 0);
        assert_true(st.resident_bytes <= budget);
        assert_int_equal(st.bytes_in - st0.bytes_in, (st.page_ins - st0.page_ins) * one);
        for (int a = 0; a < NA; a++) assert_false(mn_lora_registry_pinned(reg, a));
    }

    /* pinning: adapter 0 pinned (a batch in flight) stays resident while the others page
     * through the one remaining place; it cannot be unloaded or pushed out */
    assert_int_equal(mn_lora_registry_set_budget(reg, fx.be, 2 * one, &eb), MN_OK);
    const int32_t zero = 0;
    assert_int_equal(mn_lora_registry_pin(reg, &zero, 1, &eb), MN_OK);
    for (int k = 0; k < 6; k++) {
        int32_t a = 1 + k % 3, tok[2] = {a, -1};
        const mn_lora *const *tab;
        if (mn_lora_registry_acquire_batch(reg, tok, 2, &tab, &n_tab, &eb) != MN_OK) fail_msg("%s", eb.msg);
        assert_true(mn_lora_registry_resident(reg, 0));
        assert_true(mn_lora_registry_resident(reg, a));
        mn_lora_registry_release_batch(reg, tok, 2);
    }
    /* two more adapters do not fit beside the pinned one: refused, nothing pinned by it */
    const int32_t two[4] = {1, 2, 2, -1};
    const mn_lora *const *tab;
    assert_int_equal(mn_lora_registry_acquire_batch(reg, two, 4, &tab, &n_tab, &eb), MN_ELIMIT);
    assert_non_null(strstr(eb.msg, "held by adapters in use"));
    assert_true(mn_lora_registry_resident(reg, 0));
    assert_false(mn_lora_registry_pinned(reg, 1));
    assert_false(mn_lora_registry_pinned(reg, 2));
    assert_int_equal(mn_lora_registry_unload(reg, "a0", &eb), MN_EBUSY);
    assert_int_equal(mn_lora_registry_set_budget(reg, fx.be, one, &eb), MN_EBUSY);
    mn_lora_registry_unpin(reg, &zero, 1);
    assert_false(mn_lora_registry_pinned(reg, 0));
    if (mn_lora_registry_acquire_batch(reg, two, 4, &tab, &n_tab, &eb) != MN_OK) fail_msg("%s", eb.msg);
    mn_lora_registry_release_batch(reg, two, 4);

    mn_lora_stats st;
    /* a budget smaller than one adapter: a clear error naming both sizes, the budget kept;
     * with the budget set, loading a larger adapter is refused the same way */
    char need[96];
    assert_int_equal(mn_lora_registry_set_budget(reg, fx.be, one - 1, &eb), MN_ELIMIT);
    snprintf(need, sizeof need, "budget of %zu bytes is smaller than adapter 'a0' (%zu bytes)", one - 1, one);
    assert_non_null(strstr(eb.msg, need));
    mn_lora_registry_stats(reg, &st);
    assert_int_equal(st.budget, 2 * one);
    assert_int_equal(mn_lora_registry_unload(reg, "a3", &eb), MN_OK);
    assert_int_equal(mn_lora_registry_unload(reg, "a2", &eb), MN_OK);
    assert_int_equal(mn_lora_registry_unload(reg, "a1", &eb), MN_OK);
    assert_int_equal(mn_lora_registry_unload(reg, "a0", &eb), MN_OK);
    assert_int_equal(mn_lora_registry_set_budget(reg, fx.be, one - 1, &eb), MN_OK);
    assert_int_equal(mn_lora_registry_load(reg, "big", dirs[0], NULL, &eb), MN_ELIMIT);
    snprintf(need, sizeof need, "needs %zu bytes on the device, over the whole adapter budget of %zu bytes", one, one - 1);
    assert_non_null(strstr(eb.msg, need));
    assert_int_equal(mn_lora_registry_find(reg, "big"), -1);
    for (int a = 0; a < NA; a++) {
        char name[16];
        snprintf(name, sizeof name, "a%d", a);
        assert_int_equal(mn_lora_registry_set_budget(reg, fx.be, 0, &eb), MN_OK);
        if (mn_lora_registry_load(reg, name, dirs[a], NULL, &eb) != MN_OK) fail_msg("%s", eb.msg);
    }
    /* a bad slot */
    const int32_t t9[1] = {9};
    assert_int_equal(mn_lora_registry_acquire_batch(reg, t9, 1, &tab, &n_tab, &eb), MN_EINVALID);

    /* prefetch: the copy starts now, the acquire of the next batch finds it resident */
    mn_lora_stats st0;
    const int32_t t3[2] = {-1, 3};
    assert_int_equal(mn_lora_registry_set_budget(reg, fx.be, 2 * one, &eb), MN_OK);
    mn_lora_registry_stats(reg, &st0);
    if (!mn_lora_registry_resident(reg, 3)) {
        assert_int_equal(mn_lora_registry_prefetch(reg, t3, 2, &eb), MN_OK);
        mn_lora_registry_stats(reg, &st);
        assert_int_equal(st.page_ins, st0.page_ins + 1);
        st0 = st;
    }
    assert_true(mn_lora_registry_resident(reg, 3));
    assert_false(mn_lora_registry_pinned(reg, 3));
    if (mn_lora_registry_acquire_batch(reg, t3, 2, &tab, &n_tab, &eb) != MN_OK) fail_msg("%s", eb.msg);
    mn_lora_registry_stats(reg, &st);
    assert_int_equal(st.page_ins, st0.page_ins);
    assert_int_equal(st.unstaged, 0);
    mn_lora_registry_release_batch(reg, t3, 2);

    /* the N-th allocation of a page-in fails: an error, nothing pinned, nothing leaked */
    assert_int_equal(mn_lora_registry_set_budget(reg, fx.be, one, &eb), MN_OK);
    for (long k = 0;; k++) {
        const int32_t t2[1] = {(int32_t)(k % 2) + 1};
        int32_t was = mn_lora_registry_resident(reg, t2[0]);
        mn_alloc_fail_after(k);
        mn_err e = mn_lora_registry_acquire_batch(reg, t2, 1, &tab, &n_tab, &eb);
        mn_alloc_fail_after(-1);
        if (e == MN_OK) {
            assert_true(mn_lora_registry_resident(reg, t2[0]));
            mn_lora_registry_release_batch(reg, t2, 1);
            if (!was) break;
            continue;
        }
        assert_int_equal(e, MN_ENOMEM);
        assert_false(mn_lora_registry_pinned(reg, t2[0]));
        mn_lora_registry_stats(reg, &st);
        assert_true(st.resident_bytes <= one);
    }

    /* detaching frees every device copy */
    assert_int_equal(mn_lora_registry_set_budget(reg, NULL, 0, &eb), MN_OK);
    mn_lora_registry_stats(reg, &st);
    assert_int_equal(st.resident, 0);
    assert_int_equal(st.resident_bytes, 0);
    mn_lora_registry_free(reg);
    for (int a = 0; a < NA; a++) rm_adapter(dirs[a]);
    free(want), free(got);
    fwd_close(&fx);
}

int main(void) {
    mn_cpu_init();
    best_simd = mn_cpu_simd_name();
    printf("cpu lora at every level up to %s\n", best_simd);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lora_op),
        cmocka_unit_test(test_lora_single_path),
        cmocka_unit_test(test_lora_views_phases),
        cmocka_unit_test(test_lora_forward),
        cmocka_unit_test(test_lora_registry_add),
        cmocka_unit_test(test_lora_paging),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
