/* tests/unit/test_gemv_warp.cu — the CUDA GEMV's own warp code run on the CPU (no GPU).
 *
 * nvcc compiles this file, but only host code runs: the device kernels of
 * kernels/cuda/matmul_gemv.cu are thin wrappers (which warp, which row) around the
 * templates of kernels/cuda/matmul_gemv_warp.cuh, and those are __host__ __device__
 * templates over the warp. Here the warp is 32 host threads in lockstep: shfl_xor writes
 * the lane's value to a shared slot, waits at a barrier for all 32, reads lane l^o's slot
 * and waits again. Each thread runs exactly the code a GPU lane runs (index math, group
 * sums, butterflies, store), on the host versions of the few device-only helpers (__dp4a,
 * the 16-bit-half loads: same values; the 16-byte float loads are device-only and give the
 * same values as the scalar loads used here).
 *
 * Per weight type and T = 1, 2, 5, 8 (N = 19, odd K, strided x / y, bias, accumulate in turn):
 *   - the quantize warps' activation blocks equal mn_ref_quantize_row_q8_1 / _q8_K's, bytes;
 *   - y (row gaps and a guard tail included) equals mn_gemv_emulate's bits, the host
 *     emulation that tests/unit/test_gemv.c holds to mn_ref_matmul, and is within the
 *     ops.h tolerance of mn_ref_matmul here too;
 *   - each token alone (T = 1) gives its batch row's bits.
 * Self-contained (no cmocka): prints one line per type, exits 1 on any failure.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "kernels/ops.h"
}
#include "kernels/cuda/matmul_gemv_warp.cuh"
#include "tests/unit/weight_fill.h"

static const mn_dtype TYPES[] = {MN_F32, MN_F16, MN_BF16, MN_Q4_0, MN_Q4_1, MN_Q5_0, MN_Q5_1, MN_Q8_0, MN_Q2_K, MN_Q3_K, MN_Q4_K, MN_Q5_K, MN_Q6_K};
enum { NTYPES = sizeof(TYPES) / sizeof(TYPES[0]), GUARD = 16 };

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}
static float frand(float lo, float hi) { return lo + (hi - lo) * (float)(rnd() & 0xffffff) / 16777216.0f; }


/* ---- a warp of 32 host threads in lockstep ---------------------------------------------- */
struct lockstep {
    pthread_barrier_t bar;
    union { int i; float f; } slot[32];
};

struct host_warp {
    int l;
    lockstep *ls;
    int lane() const { return l; }
    int shfl_xor(int v, int o) const {
        ls->slot[l].i = v;
        pthread_barrier_wait(&ls->bar);
        int r = ls->slot[l ^ o].i;
        pthread_barrier_wait(&ls->bar);
        return r;
    }
    float shfl_xor(float v, int o) const {
        ls->slot[l].f = v;
        pthread_barrier_wait(&ls->bar);
        float r = ls->slot[l ^ o].f;
        pthread_barrier_wait(&ls->bar);
        return r;
    }
};

struct lane_job {
    host_warp w;
    const mn_matmul_desc *d;
    void *xq;
};

/* What one GPU lane does over the whole call: its part of every quantize warp (kernel 1),
 * then of every row's warp (kernel 2). Warps are independent on the GPU, so running them
 * one after another here changes nothing. */
template <int NT>
static void lane_rows(const lane_job *j) {
    for (int64_t n = 0; n < j->d->N; n++) mn__gemv_row<NT>(*j->d, n, j->xq, j->w);
}

static void *lane_main(void *arg) {
    const lane_job *j = (const lane_job *)arg;
    const mn_matmul_desc *d = j->d;
    int64_t be = mn_dtype_block_elems(d->w_type);
    if (be > 1) {
        int64_t ng = d->K / be;
        for (int64_t gi = 0; gi < d->T * ng; gi++) {
            if (be == MN_QK) mn__gemv_quant_block<MN_QK>(d->x, d->x_stride, ng, gi, j->xq, j->w);
            else mn__gemv_quant_block<MN_QK_K>(d->x, d->x_stride, ng, gi, j->xq, j->w);
        }
        pthread_barrier_wait(&j->w.ls->bar); /* kernel boundary */
    }
    switch (mn_gemv_nt(d->T)) {
    case 1: lane_rows<1>(j); break;
    case 2: lane_rows<2>(j); break;
    case 4: lane_rows<4>(j); break;
    default: lane_rows<8>(j); break;
    }
    return NULL;
}

/* Run the warp code for d (host pointers) on 32 threads; xq: the kernel's scratch. */
static int run_warp(const mn_matmul_desc *d, void *xq) {
    lockstep ls;
    pthread_barrier_init(&ls.bar, NULL, 32);
    lane_job jobs[32];
    pthread_t th[32];
    int ok = 1;
    for (int l = 0; l < 32; l++) {
        jobs[l].w.l = l;
        jobs[l].w.ls = &ls;
        jobs[l].d = d;
        jobs[l].xq = xq;
    }
    for (int l = 1; l < 32; l++)
        if (pthread_create(&th[l], NULL, lane_main, &jobs[l]) != 0) {
            fprintf(stderr, "pthread_create failed\n");
            exit(2);
        }
    lane_main(&jobs[0]);
    for (int l = 1; l < 32; l++) pthread_join(th[l], NULL);
    pthread_barrier_destroy(&ls.bar);
    return ok;
}

static int failures = 0;
#define CHECK(cond, ...)                                                                                              \
    do {                                                                                                              \
        if (!(cond)) {                                                                                                \
            printf("FAIL: " __VA_ARGS__);                                                                             \
            printf("\n");                                                                                             \
            failures++;                                                                                               \
            goto out;                                                                                                 \
        }                                                                                                             \
    } while (0)

/* One case; returns the worst err/tol against the reference. */
static double one_case(mn_dtype t, int64_t T, int64_t K, int variant) {
    const int64_t N = 19;
    int strided = variant & 1, bias = variant != 0, acc = variant >= 2;
    mn_matmul_desc d;
    memset(&d, 0, sizeof d);
    d.T = T, d.N = N, d.K = K, d.w_type = t, d.accumulate = acc;
    d.x_stride = strided ? K + 3 : K;
    d.y_stride = strided ? N + 5 : N;
    d.w_row_bytes = mn_dtype_row_bytes(t, K);
    int64_t be = mn_dtype_block_elems(t);
    size_t ybytes = (size_t)(T * d.y_stride) * sizeof(float) + GUARD;
    size_t xqb = mn_gemv_emulate_work_bytes(&d) + 1;
    float *x = (float *)malloc((size_t)(T * d.x_stride) * sizeof(float));
    uint8_t *w = (uint8_t *)malloc((size_t)(N * d.w_row_bytes));
    float *b = (float *)malloc((size_t)N * sizeof(float));
    float *y0 = (float *)malloc(ybytes), *yw = (float *)malloc(ybytes), *ye = (float *)malloc(ybytes);
    float *yr = (float *)malloc(ybytes), *y1 = (float *)malloc((size_t)N * sizeof(float));
    float *wrow = (float *)malloc((size_t)K * sizeof(float));
    void *xq = malloc(xqb), *xqe = malloc(xqb), *xq1 = malloc(xqb);
    double worst = 0.0;
    for (int64_t i = 0; i < T * d.x_stride; i++) x[i] = frand(-1, 1);
    if (T > 3)
        for (int64_t k = 0; k < K; k++) x[3 * d.x_stride + k] = 0.0f; /* d = 0 */
    mn_test_fill_weights(t, w, N, K, rnd, frand);
    for (int64_t n = 0; n < N; n++) b[n] = frand(-1, 1);
    memset(y0, 0xa5, ybytes);
    for (int64_t ti = 0; ti < T; ti++)
        for (int64_t n = 0; n < N; n++) y0[ti * d.y_stride + n] = acc ? frand(-2, 2) : 0.0f;
    memcpy(yw, y0, ybytes), memcpy(ye, y0, ybytes), memcpy(yr, y0, ybytes);
    memset(xq, 0x5a, xqb), memset(xqe, 0x5a, xqb);
    d.x = x, d.w = w, d.bias = bias ? b : NULL;
    {
        mn_matmul_desc dw = d, de = d, dr = d;
        dw.y = yw, de.y = ye, dr.y = yr;
        run_warp(&dw, xq);
        mn_gemv_emulate(&de, xqe);
        mn_ref_matmul(&dr);
        CHECK(be == 1 || memcmp(xq, xqe, xqb) == 0, "%s T=%lld K=%lld: quantized activations differ from the reference's",
              mn_dtype_name(t), (long long)T, (long long)K);
        for (size_t i = 0; i < ybytes / 4; i++)
            CHECK(memcmp(&yw[i], &ye[i], 4) == 0, "%s T=%lld K=%lld variant %d: float %zu = %.9g, emulation %.9g",
                  mn_dtype_name(t), (long long)T, (long long)K, variant, i, yw[i], ye[i]);
        for (int64_t n = 0; n < N; n++) {
            mn_ref_dequant_row(t, w + n * d.w_row_bytes, wrow, K);
            for (int64_t ti = 0; ti < T; ti++) {
                double s = bias ? fabs(b[n]) : 0.0;
                for (int64_t k = 0; k < K; k++) s += fabs((double)x[ti * d.x_stride + k] * wrow[k]);
                int64_t i = ti * d.y_stride + n;
                double tol = 1e-4 * s + (acc ? 2.4e-7 * (fabs(y0[i]) + fabs(yr[i])) : 0.0) + 1e-30;
                double err = fabs((double)yw[i] - yr[i]);
                CHECK(isfinite(yw[i]) && err <= tol, "%s T=%lld K=%lld: y[%lld,%lld] = %.9g, ref %.9g, tol %.3g",
                      mn_dtype_name(t), (long long)T, (long long)K, (long long)ti, (long long)n, yw[i], yr[i], tol);
                if (err / tol > worst) worst = err / tol;
            }
        }
        for (int64_t ti = 0; ti < T; ti++) { /* each token alone */
            mn_matmul_desc one = d;
            one.T = 1, one.x = x + ti * d.x_stride, one.y = y1, one.y_stride = N;
            for (int64_t n = 0; n < N; n++) y1[n] = y0[ti * d.y_stride + n];
            run_warp(&one, xq1);
            CHECK(memcmp(y1, yw + ti * d.y_stride, (size_t)N * sizeof(float)) == 0,
                  "%s T=%lld K=%lld: token %lld alone differs from its batch row", mn_dtype_name(t), (long long)T,
                  (long long)K, (long long)ti);
        }
    }
out:
    free(x), free(w), free(b), free(y0), free(yw), free(ye), free(yr), free(y1), free(wrow), free(xq), free(xqe),
        free(xq1);
    return worst;
}

int main(void) {
    static const int64_t Ts[] = {1, 2, 5, 8};
    for (int ti = 0; ti < NTYPES; ti++) {
        mn_dtype t = TYPES[ti];
        int64_t be = mn_dtype_block_elems(t);
        /* float: a K % 8 tail; legacy: 45 blocks (a partial second step); K-quants: 5
         * super-blocks (the last step's upper lane groups idle) */
        int64_t K = be == 1 ? 333 : be == MN_QK ? 45 * 32 : 5 * 256;
        double worst = 0.0;
        int before = failures;
        for (int k = 0; k < 4; k++) {
            double r = one_case(t, Ts[k], K, (ti + k) % 4);
            worst = r > worst ? r : worst;
        }
        printf("gemv warp code on host threads %-5s K=%lld T=1,2,5,8: %s (=emulation bits, =alone bits, worst err/tol vs ref %.3g)\n",
               mn_dtype_name(t), (long long)K, failures == before ? "ok" : "FAILED", worst);
    }
    printf("%s\n", failures ? "FAILED" : "ALL PASSED");
    return failures ? 1 : 0;
}
