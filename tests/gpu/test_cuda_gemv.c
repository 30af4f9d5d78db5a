/* tests/gpu/test_cuda_gemv.c — the fused dequant GEMV (mn_cuda_matmul at T <=
 * MN_CUDA_GEMV_MAX_T, kernels/cuda/matmul_gemv.cu) on the device; linked into test_cuda_ops.
 *
 * Per weight type (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and T = 1, 2, 5, 8,
 * on N = 67 rows (not a multiple of the 8 rows of a CTA) and odd K (float: 1029, a K % 8
 * tail; legacy: 45 blocks; K-quants: 5 super-blocks, a half-idle last warp step), with
 * strided x / y, bias and accumulate in turn:
 *   1. mn_cuda_matmul against mn_ref_matmul: |y - ref| <= 1e-4 * (sum|x w| + |b|) (ops.h;
 *      plus the last rounding of an accumulate), NaN/inf fails;
 *   2. the whole y allocation (stride gaps, guard bytes) bit-identical to the host
 *      emulation mn_gemv_emulate (kernels/cuda/matmul_gemv.h), which tests/unit/test_gemv.c
 *      checks against the reference on every CI run;
 *   3. every token alone (T = 1) gives its batch row's bits (batch invariance).
 * Then timing lines (not checks) per type at Llama-3-8B shapes, N x K = 4096 x 4096 (q/o)
 * and 14336 x 4096 (gate/up): microseconds per call of the GEMV at T = 1 and 8, and of the
 * bf16 + cuBLAS path (mn_cuda_matmul_cublas) at T = 1 and 8, with the weight bytes read per
 * second of each next to the device-to-device copy bandwidth (read + write bytes).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/matmul_gemv.h"
#include "kernels/cuda/ops_cuda.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/unit/weight_fill.h"

double gt_copy_gbps(cudaStream_t s); /* tests/gpu/test_cuda_attention.c */

static const mn_dtype gtypes[] = {MN_F32, MN_F16, MN_BF16, MN_Q4_0, MN_Q4_1, MN_Q5_0, MN_Q5_1, MN_Q8_0, MN_Q2_K, MN_Q3_K, MN_Q4_K, MN_Q5_K, MN_Q6_K};
enum { NGTYPES = sizeof gtypes / sizeof gtypes[0] };

static uint32_t gemv_byte(void) { return (uint32_t)gt_rnd_int(256); }

/* Random weights (tests/unit/weight_fill.h) in the arena */
static void *gemv_weights(gt_arena *a, mn_dtype t, int64_t N, int64_t K, int64_t *row_bytes) {
    *row_bytes = mn_dtype_row_bytes(t, K);
    void *p = gt_host(a, (size_t)(N * *row_bytes), NULL);
    mn_test_fill_weights(t, p, N, K, gemv_byte, gt_unif);
    return p;
}

/* Check 1 of a matmul case: the device's y (got; y0: y before the call, ref: the reference's
 * y) within the ops.h tolerance 1e-4 * (sum|x w| + |b|), plus the last rounding of an
 * accumulate; NaN/inf fails. *worst: the largest err / tol. 0 and a message in why if not. */
static int check_vs_ref(const mn_matmul_desc *d, const float *x, const float *ref, const float *got, const float *y0,
                        double *worst, char *why, size_t nwhy) {
    float *wrow = malloc((size_t)d->K * sizeof(float));
    int ok = 1;
    for (int64_t n = 0; n < d->N && ok; n++) {
        mn_ref_dequant_row(d->w_type, (const char *)d->w + n * d->w_row_bytes, wrow, d->K);
        for (int64_t ti = 0; ti < d->T; ti++) {
            double sum = d->bias ? fabs(d->bias[n]) : 0.0;
            for (int64_t k = 0; k < d->K; k++) sum += fabs((double)x[ti * d->x_stride + k] * wrow[k]);
            int64_t i = ti * d->y_stride + n;
            double tol = 1e-4 * sum + (d->accumulate ? 2.4e-7 * (fabs(y0[i]) + fabs(ref[i])) : 0.0) + 1e-30;
            double err = fabs((double)got[i] - ref[i]);
            if (!isfinite(got[i]) || !(err <= tol)) {
                snprintf(why, nwhy, "y[%lld,%lld] = %.9g, ref %.9g, tol %.3g", (long long)ti, (long long)n, got[i], ref[i],
                         tol);
                ok = 0;
                break;
            }
            if (err / tol > *worst) *worst = err / tol;
        }
    }
    free(wrow);
    return ok;
}

/* Check 3: every token of dd (device pointers; y0 / got as above, host) run alone (T = 1,
 * through mn_cuda_matmul, or mn_cuda_matmul_mmq when mmq) gives its batch row's bits. */
static int check_alone(const mn_matmul_desc *dd, int mmq, void *dwork, size_t need, const float *y0, const float *got,
                       cudaStream_t s, char *why, size_t nwhy) {
    const int64_t N = dd->N;
    float *y1 = malloc((size_t)N * sizeof(float)), *dy1 = NULL;
    mn_errbuf eb = {{0}};
    int ok = cudaMalloc((void **)&dy1, (size_t)N * sizeof(float)) == cudaSuccess;
    if (!ok) snprintf(why, nwhy, "cudaMalloc failed");
    for (int64_t ti = 0; ti < dd->T && ok; ti++) {
        mn_matmul_desc one = *dd;
        one.T = 1;
        one.x = dd->x + ti * dd->x_stride;
        one.y = dy1;
        one.y_stride = N;
        for (int64_t n = 0; n < N; n++) y1[n] = y0[ti * dd->y_stride + n];
        if (cudaMemcpy(dy1, y1, (size_t)N * sizeof(float), cudaMemcpyHostToDevice) != cudaSuccess ||
            (mmq ? mn_cuda_matmul_mmq(&one, dwork, need, s, &eb) : mn_cuda_matmul(&one, dwork, need, NULL, s, &eb)) !=
                MN_OK ||
            cudaStreamSynchronize(s) != cudaSuccess ||
            cudaMemcpy(y1, dy1, (size_t)N * sizeof(float), cudaMemcpyDeviceToHost) != cudaSuccess) {
            snprintf(why, nwhy, "token %lld alone: %s", (long long)ti, eb.msg[0] ? eb.msg : "cuda error");
            ok = 0;
        } else if (memcmp(y1, got + ti * dd->y_stride, (size_t)N * sizeof(float)) != 0) {
            snprintf(why, nwhy, "token %lld alone differs from its row in the T=%lld batch", (long long)ti,
                     (long long)dd->T);
            ok = 0;
        }
    }
    if (dy1) cudaFree(dy1);
    free(y1);
    return ok;
}

/* One case; returns 1 on pass and prints one line. */
static int gemv_case(mn_dtype t, int64_t T, int variant, uint32_t seed, cudaStream_t s) {
    gt_arena a;
    gt_arena_init(&a);
    gt_seed(seed);
    int64_t be = mn_dtype_block_elems(t), N = 67, K = be == 1 ? 1029 : be == MN_QK ? 45 * 32 : 5 * 256;
    int strided = variant & 1, bias = variant != 0, acc = variant >= 2, yi;
    mn_matmul_desc d = {.T = T, .N = N, .K = K, .w_type = t, .accumulate = acc};
    d.x_stride = strided ? K + 3 : K;
    d.y_stride = strided ? N + 5 : N;
    float *x = gt_matrix(&a, T, K, d.x_stride, -1, 1, NULL);
    if (T > 3)
        for (int64_t k = 0; k < K; k++) x[3 * d.x_stride + k] = 0.0f; /* d = 0 in the q8 blocks */
    d.x = x;
    d.w = gemv_weights(&a, t, N, K, &d.w_row_bytes);
    d.bias = bias ? gt_matrix(&a, 1, N, N, -1, 1, NULL) : NULL;
    d.y = acc ? gt_matrix(&a, T, N, d.y_stride, -2, 2, &yi) : gt_out(&a, T, N, d.y_stride, &yi);
    size_t ybytes = a.bytes[yi];
    uint8_t *y0 = malloc(ybytes), *yemu = malloc(ybytes), *got = malloc(ybytes);
    size_t wb = mn_gemv_emulate_work_bytes(&d);
    void *hwork = malloc(wb ? wb : 1), *dwork = NULL;
    char why[640] = "";
    double worst = 0;
    int ok = 0;
    mn_errbuf eb = {{0}};
    memcpy(y0, a.host[yi], ybytes);
    size_t need = mn_cuda_matmul_work_bytes(&d);
    if (gt_upload(&a, &eb) != MN_OK || (need && cudaMalloc(&dwork, need) != cudaSuccess)) {
        snprintf(why, sizeof why, "upload: %s", eb.msg[0] ? eb.msg : "cudaMalloc failed");
        goto done;
    }
    mn_matmul_desc dd = d;
    dd.x = gt_dev_of(&a, d.x);
    dd.w = gt_dev_of(&a, d.w);
    dd.bias = gt_dev_of(&a, d.bias);
    dd.y = gt_dev_of(&a, d.y);
    mn_matmul_desc he = d; /* the emulation on a copy of y */
    he.y = (float *)yemu;
    memcpy(yemu, y0, ybytes);
    mn_gemv_emulate(&he, hwork);
    mn_ref_matmul(&d);
    mn_err e = mn_cuda_matmul(&dd, dwork, need, NULL, s, &eb);
    cudaError_t ce = cudaStreamSynchronize(s);
    if (e == MN_OK && ce == cudaSuccess) ce = cudaMemcpy(got, a.dev[yi], ybytes, cudaMemcpyDeviceToHost);
    if (e != MN_OK || ce != cudaSuccess) {
        snprintf(why, sizeof why, "%s", e != MN_OK ? eb.msg : cudaGetErrorString(ce));
        goto done;
    }
    /* 1. against the reference, the contract's tolerance */
    if (!check_vs_ref(&d, x, a.host[yi], (const float *)got, (const float *)y0, &worst, why, sizeof why)) goto done;
    /* 2. the host emulation's bits, gaps and guard included */
    for (size_t i = 0; i < ybytes; i++)
        if (got[i] != yemu[i]) {
            snprintf(why, sizeof why, "byte %zu (float %zu) differs from the host emulation", i, i / 4);
            goto done;
        }
    /* 3. every token alone */
    if (!check_alone(&dd, 0, dwork, need, (const float *)y0, (const float *)got, s, why, sizeof why)) goto done;
    ok = 1;
done:
    printf("gemv      %-5s T=%lld N=%lld K=%lld %-22s r=%-7.3g =emulation, =alone %s%s\n", mn_dtype_name(t), (long long)T,
           (long long)N, (long long)K, variant == 0 ? "" : variant == 1 ? "stride bias" : variant == 2 ? "acc bias" : "stride acc bias",
           worst, ok ? "ok" : "FAIL: ", ok ? "" : why);
    free(y0), free(yemu), free(got), free(hwork);
    if (dwork) cudaFree(dwork);
    gt_arena_free(&a);
    return ok;
}

/* Microseconds per call of f over reps calls (after one warm-up); -1 on an error. */
static double time_calls(const mn_matmul_desc *d, int cublas_path, void *work, size_t work_bytes,
                         cublasHandle_t blas, cudaStream_t s) {
    mn_errbuf eb = {{0}};
    enum { REPS = 20 };
    cudaEvent_t e0, e1;
    float ms = 0;
    for (int r = 0; r <= REPS; r++) {
        if (r == 1) {
            cudaEventCreate(&e0);
            cudaEventCreate(&e1);
            cudaEventRecord(e0, s);
        }
        mn_err e = cublas_path ? mn_cuda_matmul_cublas(d, work, work_bytes, blas, s, &eb)
                               : mn_cuda_matmul_gemv(d, work, work_bytes, s, &eb);
        if (e != MN_OK) {
            printf("  timing: %s\n", eb.msg);
            if (r >= 1) cudaEventDestroy(e0), cudaEventDestroy(e1);
            return -1;
        }
    }
    cudaEventRecord(e1, s);
    cudaEventSynchronize(e1);
    cudaEventElapsedTime(&ms, e0, e1);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return cudaGetLastError() == cudaSuccess ? ms * 1000.0 / REPS : -1;
}

/* Timing lines at Llama-3-8B shapes; weights and x are a byte pattern (0x3c: small finite
 * values in every type), the time does not depend on them. */
static void gemv_timing(cudaStream_t s, cublasHandle_t blas) {
    static const int64_t shapes[3][2] = {{4096, 4096}, {14336, 4096}, {4096, 14336}};
    double copy = gt_copy_gbps(s);
    for (int si = 0; si < 3; si++) {
        int64_t N = shapes[si][0], K = shapes[si][1];
        void *w = NULL, *work = NULL;
        float *x = NULL, *y = NULL;
        size_t wmax = (size_t)N * (size_t)K * 4, workmax = 0;
        for (int ti = 0; ti < NGTYPES; ti++) {
            mn_matmul_desc d = {.T = 8, .N = N, .K = K, .w_type = gtypes[ti], .x_stride = K, .y_stride = N};
            size_t a = mn_cuda_matmul_cublas_work_bytes(&d), b = mn_cuda_matmul_gemv_work_bytes(&d);
            workmax = a > workmax ? a : workmax;
            workmax = b > workmax ? b : workmax;
        }
        if (cudaMalloc(&w, wmax) != cudaSuccess || cudaMalloc(&work, workmax) != cudaSuccess ||
            cudaMalloc((void **)&x, (size_t)(8 * K) * sizeof(float)) != cudaSuccess ||
            cudaMalloc((void **)&y, (size_t)(8 * N) * sizeof(float)) != cudaSuccess) {
            printf("gemv-time N=%lld K=%lld: skipped (device memory)\n", (long long)N, (long long)K);
        } else {
            cudaMemset(w, 0x3c, wmax);
            cudaMemset(x, 0x3c, (size_t)(8 * K) * sizeof(float));
            for (int ti = 0; ti < NGTYPES; ti++) {
                mn_dtype t = gtypes[ti];
                mn_matmul_desc d = {.N = N, .K = K, .x = x, .x_stride = K, .w = w, .w_type = t, .y = y, .y_stride = N};
                d.w_row_bytes = mn_dtype_row_bytes(t, K);
                double mb = (double)(N * d.w_row_bytes) / 1e6, us[4];
                for (int c = 0; c < 4; c++) {
                    d.T = c % 2 == 0 ? 1 : 8;
                    us[c] = time_calls(&d, c >= 2, work, workmax, blas, s);
                }
                printf("gemv-time %-5s N=%-5lld K=%-5lld W %6.1f MB  gemv T=1 %7.1f us %5.0f GB/s  T=8 %7.1f us %5.0f GB/s"
                       "  | bf16+cublas T=1 %7.1f us  T=8 %7.1f us  (d2d copy %.0f GB/s)\n",
                       mn_dtype_name(t), (long long)N, (long long)K, mb, us[0], us[0] > 0 ? mb * 1e-3 / (us[0] * 1e-6) : 0,
                       us[1], us[1] > 0 ? mb * 1e-3 / (us[1] * 1e-6) : 0, us[2], us[3], copy);
            }
        }
        cudaFree(w), cudaFree(work), cudaFree(x), cudaFree(y);
    }
}

/* mn_cuda_matmul_gemv_multi: n matmuls on one x (different N, types of one activation
 * block size, bias / accumulate on some) in one launch give, byte for byte, what n
 * mn_cuda_matmul_gemv calls give (outputs with their guard bytes); with quantize = false
 * after a GEMV that left x's blocks, the same; a matmul on another x is refused. */
static int gemv_multi_case(const mn_dtype *types, int n, int64_t T, uint32_t seed, cudaStream_t s) {
    gt_arena a;
    gt_arena_init(&a);
    gt_seed(seed);
    const int64_t Ns[3] = {67, 19, 33};
    int64_t be = mn_dtype_block_elems(types[0]), K = be == MN_QK ? 45 * 32 : 5 * 256;
    mn_matmul_desc d[3], dd[3];
    int yi[3];
    float *x = gt_matrix(&a, T, K, K + 3, -1, 1, NULL);
    for (int k = 0; k < n; k++) {
        d[k] = (mn_matmul_desc){.T = T, .N = Ns[k], .K = K, .x = x, .x_stride = K + 3, .w_type = types[k],
                                .accumulate = k == 1, .y_stride = Ns[k] + 1};
        d[k].w = gemv_weights(&a, types[k], Ns[k], K, &d[k].w_row_bytes);
        d[k].bias = k != 0 ? gt_matrix(&a, 1, Ns[k], Ns[k], -1, 1, NULL) : NULL;
        d[k].y = k == 1 ? gt_matrix(&a, T, Ns[k], d[k].y_stride, -2, 2, &yi[k]) : gt_out(&a, T, Ns[k], d[k].y_stride, &yi[k]);
    }
    mn_errbuf eb = {{0}};
    size_t need = mn_cuda_matmul_gemv_work_bytes(&d[0]);
    void *work = NULL;
    uint8_t *sep[3] = {0}, *got = NULL;
    char why[640] = "";
    int ok = 0;
    if (gt_upload(&a, &eb) != MN_OK || (need && cudaMalloc(&work, need) != cudaSuccess)) {
        snprintf(why, sizeof why, "upload: %s", eb.msg[0] ? eb.msg : "cudaMalloc failed");
        goto done;
    }
    for (int k = 0; k < n; k++) {
        dd[k] = d[k];
        dd[k].x = gt_dev_of(&a, d[k].x), dd[k].w = gt_dev_of(&a, d[k].w), dd[k].bias = gt_dev_of(&a, d[k].bias);
        dd[k].y = gt_dev_of(&a, d[k].y);
    }
    /* 1. separate calls (their outputs saved), 2. outputs reset, one multi call, compared;
     * 3. reset again, one GEMV on matmul 0 then the multi without quantizing, compared */
    for (int pass = 0; pass < 3 && !why[0]; pass++) {
        for (int k = 0; k < n; k++)
            if (cudaMemcpy(a.dev[yi[k]], a.host[yi[k]], a.bytes[yi[k]], cudaMemcpyHostToDevice) != cudaSuccess)
                snprintf(why, sizeof why, "reset of y %d failed", k);
        mn_err e = MN_OK;
        if (pass == 0)
            for (int k = 0; k < n && e == MN_OK; k++) e = mn_cuda_matmul_gemv(&dd[k], work, need, s, &eb);
        else if (pass == 1)
            e = mn_cuda_matmul_gemv_multi(dd, n, work, need, true, s, &eb);
        else {
            mn_matmul_desc first = dd[0];
            if (cudaMemset(work, 0x55, need) != cudaSuccess) snprintf(why, sizeof why, "memset failed");
            e = mn_cuda_matmul_gemv(&first, work, need, s, &eb);
            if (e == MN_OK && cudaMemcpy(a.dev[yi[0]], a.host[yi[0]], a.bytes[yi[0]], cudaMemcpyHostToDevice) != cudaSuccess)
                snprintf(why, sizeof why, "reset of y 0 failed");
            if (e == MN_OK) e = mn_cuda_matmul_gemv_multi(dd, n, work, need, false, s, &eb);
        }
        if (e != MN_OK || cudaStreamSynchronize(s) != cudaSuccess) {
            snprintf(why, sizeof why, "pass %d: %s", pass, e != MN_OK ? eb.msg : "cuda error");
            break;
        }
        for (int k = 0; k < n && !why[0]; k++) {
            uint8_t *buf = malloc(a.bytes[yi[k]]);
            cudaMemcpy(buf, a.dev[yi[k]], a.bytes[yi[k]], cudaMemcpyDeviceToHost);
            if (pass == 0) {
                sep[k] = buf;
                continue;
            }
            for (size_t i = 0; i < a.bytes[yi[k]]; i++)
                if (buf[i] != sep[k][i]) {
                    snprintf(why, sizeof why, "pass %d: matmul %d byte %zu differs from the separate calls", pass, k, i);
                    break;
                }
            const float *y0 = (const float *)buf;
            if (!why[0] && !isfinite(y0[0])) snprintf(why, sizeof why, "matmul %d: y[0] not written", k);
            free(buf);
        }
    }
    if (!why[0]) { /* another x: refused, naming the matmul */
        mn_matmul_desc bad[2] = {dd[0], dd[0]};
        bad[1].x = dd[0].x + 1;
        mn_err e = mn_cuda_matmul_gemv_multi(bad, 2, work, need, true, s, &eb);
        if (e != MN_EINVALID || !strstr(eb.msg, "matmul 1"))
            snprintf(why, sizeof why, "a matmul on another x: got %d (%s), want MN_EINVALID naming matmul 1", (int)e, eb.msg);
    }
    ok = !why[0];
done:
    printf("gemv-multi %d matmuls (%s..) T=%lld  =separate calls, =after reuse %s%s\n", n, mn_dtype_name(types[0]),
           (long long)T, ok ? "ok" : "FAIL: ", ok ? "" : why);
    for (int k = 0; k < 3; k++) free(sep[k]);
    free(got);
    if (work) cudaFree(work);
    gt_arena_free(&a);
    return ok;
}

/* The int8 tensor-core matmul (kernels/cuda/matmul_mmq.cu, off in mn_cuda_matmul until a
 * GPU run has checked it): against mn_ref_matmul within the ops.h tolerance 1e-4 * (sum|x w|
 * + |b|) (plus an accumulate's rounding), every byte outside the output rows unchanged,
 * every token alone giving its row's bits, and mn_cuda_matmul with the mmq on giving the
 * same bits as the direct call. */
static int mmq_case(mn_dtype t, int64_t T, int variant, int64_t N, int64_t K, uint32_t seed, cudaStream_t s) {
    gt_arena a;
    gt_arena_init(&a);
    gt_seed(seed);
    int strided = variant & 1, bias = variant != 0, acc = variant >= 2, yi;
    mn_matmul_desc d = {.T = T, .N = N, .K = K, .w_type = t, .accumulate = acc};
    d.x_stride = strided ? K + 3 : K;
    d.y_stride = strided ? N + 5 : N;
    float *x = gt_matrix(&a, T, K, d.x_stride, -1, 1, NULL);
    if (T > 3)
        for (int64_t k = 0; k < K; k++) x[3 * d.x_stride + k] = 0.0f; /* d = 0 in the q8 blocks */
    d.x = x;
    d.w = gemv_weights(&a, t, N, K, &d.w_row_bytes);
    d.bias = bias ? gt_matrix(&a, 1, N, N, -1, 1, NULL) : NULL;
    d.y = acc ? gt_matrix(&a, T, N, d.y_stride, -2, 2, &yi) : gt_out(&a, T, N, d.y_stride, &yi);
    size_t ybytes = a.bytes[yi];
    uint8_t *y0 = malloc(ybytes), *got = malloc(ybytes), *got2 = malloc(ybytes);
    void *dwork = NULL;
    char why[640] = "";
    double worst = 0;
    int ok = 0;
    mn_errbuf eb = {{0}};
    memcpy(y0, a.host[yi], ybytes);
    size_t need = mn_cuda_matmul_mmq_work_bytes(&d), needm = mn_cuda_matmul_work_bytes(&d);
    if (needm > need) need = needm;
    if (gt_upload(&a, &eb) != MN_OK || cudaMalloc(&dwork, need) != cudaSuccess) {
        snprintf(why, sizeof why, "upload: %s", eb.msg[0] ? eb.msg : "cudaMalloc failed");
        goto done;
    }
    mn_matmul_desc dd = d;
    dd.x = gt_dev_of(&a, d.x), dd.w = gt_dev_of(&a, d.w), dd.bias = gt_dev_of(&a, d.bias), dd.y = gt_dev_of(&a, d.y);
    mn_ref_matmul(&d);
    mn_err e = mn_cuda_matmul_mmq(&dd, dwork, need, s, &eb);
    cudaError_t ce = cudaStreamSynchronize(s);
    if (e == MN_OK && ce == cudaSuccess) ce = cudaMemcpy(got, a.dev[yi], ybytes, cudaMemcpyDeviceToHost);
    if (e != MN_OK || ce != cudaSuccess) {
        snprintf(why, sizeof why, "%s", e != MN_OK ? eb.msg : cudaGetErrorString(ce));
        goto done;
    }
    const float *g32 = (const float *)got, *in = (const float *)y0;
    if (!check_vs_ref(&d, x, a.host[yi], g32, in, &worst, why, sizeof why)) goto done;
    for (size_t i = 0; i < ybytes; i++) { /* outside the rows: stride gaps and guard */
        size_t f = i / 4;
        int64_t ti = (int64_t)f / d.y_stride, n = (int64_t)f % d.y_stride;
        if (ti < T && n < N && f < (size_t)(T * d.y_stride)) continue;
        if (got[i] != y0[i]) {
            snprintf(why, sizeof why, "byte %zu outside the output rows changed", i);
            goto done;
        }
    }
    if (!check_alone(&dd, 1, dwork, need, in, g32, s, why, sizeof why)) goto done; /* every token alone */
    if (T > MN_CUDA_GEMV_MAX_T) { /* the dispatch: mn_cuda_matmul with the mmq on */
        if (cudaMemcpy(a.dev[yi], y0, ybytes, cudaMemcpyHostToDevice) != cudaSuccess) {
            snprintf(why, sizeof why, "reset of y failed");
            goto done;
        }
        mn_cuda_matmul_mmq_enable(1);
        e = mn_cuda_matmul(&dd, dwork, need, NULL, s, &eb);
        mn_cuda_matmul_mmq_enable(0);
        if (e != MN_OK || cudaStreamSynchronize(s) != cudaSuccess ||
            cudaMemcpy(got2, a.dev[yi], ybytes, cudaMemcpyDeviceToHost) != cudaSuccess || memcmp(got, got2, ybytes) != 0) {
            snprintf(why, sizeof why, "mn_cuda_matmul with the mmq on: %s", e != MN_OK ? eb.msg : "other bits than the direct call");
            goto done;
        }
    }
    ok = 1;
done:
    printf("mmq       %-5s T=%-2lld N=%lld K=%-4lld %-16s r=%-7.3g =alone %s%s\n", mn_dtype_name(t), (long long)T,
           (long long)N, (long long)K, variant == 0 ? "" : variant == 1 ? "stride bias" : variant == 2 ? "acc bias" : "stride acc bias",
           worst, ok ? "ok" : "FAIL: ", ok ? "" : why);
    free(y0), free(got), free(got2);
    if (dwork) cudaFree(dwork);
    gt_arena_free(&a);
    return ok;
}

/* mmq against cuBLAS on a bf16 copy made once (what the backend runs for these batches),
 * Llama-3-8B shapes, microseconds per call (timing lines, not checks) */
static void mmq_timing(cudaStream_t s, cublasHandle_t blas) {
    static const int64_t shapes[3][2] = {{4096, 4096}, {14336, 4096}, {4096, 14336}};
    static const mn_dtype types[2] = {MN_Q4_0, MN_Q8_0};
    static const int64_t Ts[3] = {16, 32, 64};
    for (int si = 0; si < 3; si++)
        for (int ty = 0; ty < 2; ty++) {
            const int64_t N = shapes[si][0], K = shapes[si][1];
            const mn_dtype t = types[ty];
            mn_matmul_desc d = {.T = 64, .N = N, .K = K, .w_type = t, .x_stride = K, .y_stride = N};
            d.w_row_bytes = mn_dtype_row_bytes(t, K);
            void *w = NULL, *work = NULL;
            uint16_t *wb = NULL;
            float *x = NULL, *y = NULL;
            size_t wn = (size_t)(N * d.w_row_bytes), workn = mn_cuda_matmul_mmq_work_bytes(&d);
            size_t wp = mn_cuda_matmul_prepared_work_bytes(&d);
            if (wp > workn) workn = wp;
            mn_errbuf eb = {{0}};
            if (cudaMalloc(&w, wn) != cudaSuccess || cudaMalloc(&work, workn) != cudaSuccess ||
                cudaMalloc((void **)&wb, (size_t)(N * K) * 2) != cudaSuccess ||
                cudaMalloc((void **)&x, (size_t)(64 * K) * sizeof(float)) != cudaSuccess ||
                cudaMalloc((void **)&y, (size_t)(64 * N) * sizeof(float)) != cudaSuccess) {
                printf("mmq-time N=%lld K=%lld: skipped (device memory)\n", (long long)N, (long long)K);
            } else {
                cudaMemset(w, 0x3c, wn);
                cudaMemset(x, 0x3c, (size_t)(64 * K) * sizeof(float));
                d.w = w, d.x = x, d.y = y;
                if (mn_cuda_dequant_bf16(t, w, N, K, d.w_row_bytes, wb, s, &eb) != MN_OK) printf("  dequant: %s\n", eb.msg);
                printf("mmq-time  %-5s N=%-5lld K=%-5lld W %6.1f MB", mn_dtype_name(t), (long long)N, (long long)K, wn / 1e6);
                for (int ti = 0; ti < 3; ti++) {
                    d.T = Ts[ti];
                    double us[2];
                    for (int path = 0; path < 2; path++) {
                        cudaEvent_t e0, e1;
                        float ms = 0;
                        cudaEventCreate(&e0), cudaEventCreate(&e1);
                        mn_err e = MN_OK;
                        for (int r = 0; r <= 20 && e == MN_OK; r++) {
                            if (r == 1) cudaEventRecord(e0, s);
                            e = path == 0 ? mn_cuda_matmul_mmq(&d, work, workn, s, &eb)
                                          : mn_cuda_matmul_prepared(&d, wb, K, work, workn, blas, s, &eb);
                        }
                        cudaEventRecord(e1, s);
                        cudaEventSynchronize(e1);
                        cudaEventElapsedTime(&ms, e0, e1);
                        cudaEventDestroy(e0), cudaEventDestroy(e1);
                        us[path] = e == MN_OK && cudaGetLastError() == cudaSuccess ? ms * 1000.0 / 20 : -1;
                    }
                    printf("  T=%lld mmq %7.1f us (%5.0f GB/s) cublas-bf16 %7.1f us", (long long)d.T, us[0],
                           us[0] > 0 ? wn / 1e3 / us[0] : 0.0, us[1]);
                }
                printf("\n");
            }
            cudaFree(w), cudaFree(work), cudaFree(wb), cudaFree(x), cudaFree(y);
        }
}

/* All GEMV checks, then the timing lines; returns 1 if every check passed. */
int gt_gemv(cudaStream_t s, cublasHandle_t blas) {
    static const int64_t Ts[] = {1, 2, 5, 8};
    int pass = 0, n = 0;
    for (int ti = 0; ti < NGTYPES; ti++)
        for (int k = 0; k < 4; k++, n++) pass += gemv_case(gtypes[ti], Ts[k], (ti + k) % 4, 300 + (uint32_t)n, s);
    static const mn_dtype legacy[3] = {MN_Q4_0, MN_Q4_1, MN_Q8_0}, kq[2] = {MN_Q4_K, MN_Q6_K};
    pass += gemv_multi_case(legacy, 3, 1, 900, s), n++;
    pass += gemv_multi_case(legacy, 3, 5, 901, s), n++;
    pass += gemv_multi_case(kq, 2, 2, 902, s), n++;
    int mpass = 0, mn = 0;
    static const mn_dtype mtypes[3] = {MN_Q4_0, MN_Q4_1, MN_Q8_0};
    static const int64_t mTs[5] = {1, 9, 16, 33, 64};
    for (int ti = 0; ti < 3; ti++)
        for (int k = 0; k < 5; k++, mn++) /* K = 45 blocks: the eight warps get 6, ..., 6, 3 */
            mpass += mmq_case(mtypes[ti], mTs[k], (ti + k) % 4, 67, 45 * 32, 700 + (uint32_t)mn, s);
    for (int ti = 0; ti < 3; ti++, mn++) mpass += mmq_case(mtypes[ti], 64, ti % 4, 50, 4096, 720 + (uint32_t)mn, s);
    printf("mmq: %d/%d passed\n", mpass, mn);
    pass += mpass, n += mn;
    printf("gemv: %d/%d passed\n", pass, n);
    if (pass == n) gemv_timing(s, blas);
    if (pass == n) mmq_timing(s, blas);
    return pass == n;
}
