/* tests/gpu/test_cuda_sample.c — the sample op on the device (mn_cuda_sample,
 * kernels/cuda/sample.cu) against mn_ref_sample; linked into test_cuda_ops.
 *
 * Checks: batches of 16 rows (row stride V + 5) at V = 1, 17, 1001, 4099, 50001, 128257,
 * the six logit kinds of tests/unit/sample_check.h (ties, -inf and NaN, all equal, +-0.0,
 * peaked), random parameter combinations (greedy, top_k 1 / 2 / 40 / V-1 / V / > V, top_p,
 * min_p, n_logprobs 0 / 1 / 20) and u = 0, 1 - 2^-53, random, exactly on a boundary. Each
 * row must agree with the reference as sc_check allows (ops.h: the token exact except in
 * a MN_SAMPLE_TOL boundary case, top ids exact, logprobs within MN_SAMPLE_TOL); the
 * output arrays' guard bytes must stay 0xff. Boundary cases are counted and printed; among
 * rows whose u was not put on a boundary on purpose they must stay under 1% (first H200
 * run: 11 of 512 rows differed in all, which is what the on-purpose rows make likely).
 * Then timing lines (not checks): microseconds per call at V = 128256 for 1, 16 and 64
 * rows, with the defaults (T 0.8, top_k 40, top_p 0.95, min_p 0.05), top-p alone (0.9),
 * and greedy.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/ops_cuda.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/unit/sample_check.h"

enum { GS_ROWS = 16, GS_TOP = MN_SAMPLE_MAX_TOP };

static int guard_ok(const void *p, size_t bytes) {
    const uint8_t *g = (const uint8_t *)p + bytes;
    for (int i = 0; i < GT_GUARD; i++)
        if (g[i] != 0xff) return 0;
    return 1;
}

/* One batch at V; returns 1 if every row passes. */
/* *boundary counts boundary cases among rows whose u was drawn freely; rows whose u is
 * put exactly on a cumulative boundary (sc_u mode 3) are boundary cases by construction,
 * and their differences are counted apart in *on_purpose. */
static int sample_batch(int32_t V, cudaStream_t s, long *rows, long *boundary, long *on_purpose) {
    gt_arena a;
    gt_arena_init(&a);
    mn_errbuf eb = {{0}};
    int64_t stride = (int64_t)V + 5;
    float *l = gt_host(&a, (size_t)(stride * GS_ROWS) * sizeof(float), NULL);
    mn_sample_params *ps = gt_host(&a, GS_ROWS * sizeof *ps, NULL);
    int32_t *tok = gt_host(&a, GS_ROWS * sizeof(int32_t), NULL);
    float *lp = gt_host(&a, GS_ROWS * sizeof(float), NULL);
    int32_t *tid = gt_host(&a, GS_ROWS * GS_TOP * sizeof(int32_t), NULL);
    float *tlp = gt_host(&a, GS_ROWS * GS_TOP * sizeof(float), NULL);
    int u_mode[GS_ROWS];
    for (int r = 0; r < GS_ROWS; r++) {
        sc_fill(l + r * stride, V, (int)(sc_rand() * SC_KINDS));
        ps[r] = sc_params((int)(sc_rand() * SC_NPARAMS), V);
        u_mode[r] = (int)(sc_rand() * 4);
        ps[r].u = sc_u(u_mode[r], l + r * stride, V, &ps[r]);
    }
    int ok = 1;
    if (gt_upload(&a, &eb) != MN_OK) {
        printf("sample    V %-6d FAIL: %s\n", (int)V, eb.msg);
        gt_arena_free(&a);
        return 0;
    }
    mn_sample_desc dd = {GS_ROWS, V, gt_dev_of(&a, l), stride, gt_dev_of(&a, ps), gt_dev_of(&a, tok),
                         gt_dev_of(&a, lp), gt_dev_of(&a, tid), gt_dev_of(&a, tlp)};
    if (mn_cuda_sample(&dd, s, &eb) != MN_OK || cudaStreamSynchronize(s) != cudaSuccess) {
        printf("sample    V %-6d FAIL: %s %s\n", (int)V, eb.msg, cudaGetErrorString(cudaGetLastError()));
        gt_arena_free(&a);
        return 0;
    }
    void *outs[4] = {tok, lp, tid, tlp};
    for (int k = 0; k < 4; k++) {
        void *dev = gt__dev_of(&a, outs[k]);
        for (int i = 0; i < a.n; i++)
            if (a.host[i] == outs[k]) cudaMemcpy(outs[k], dev, a.bytes[i], cudaMemcpyDeviceToHost);
    }
    int32_t rtok[GS_ROWS], rtid[GS_ROWS * GS_TOP];
    float rlp[GS_ROWS], rtlp[GS_ROWS * GS_TOP];
    mn_sample_desc rd = {GS_ROWS, V, l, stride, ps, rtok, rlp, rtid, rtlp};
    mn_ref_sample(&rd);
    if (!guard_ok(tok, GS_ROWS * 4) || !guard_ok(lp, GS_ROWS * 4) || !guard_ok(tid, GS_ROWS * GS_TOP * 4) ||
        !guard_ok(tlp, GS_ROWS * GS_TOP * 4)) {
        printf("sample    V %-6d FAIL: a write past an output (guard bytes)\n", (int)V);
        ok = 0;
    }
    for (int r = 0; r < GS_ROWS && ok; r++) {
        char why[200];
        int b;
        (*rows)++;
        if (!sc_check(l + r * stride, V, &ps[r], tok[r], &lp[r], tid + r * GS_TOP, tlp + r * GS_TOP, rtok[r],
                      rtid + r * GS_TOP, why, sizeof why, &b)) {
            printf("sample    V %-6d row %d (T %g k %d p %g min_p %g n %d u %.17g) FAIL: %s\n", (int)V, r,
                   (double)ps[r].temperature, (int)ps[r].top_k, (double)ps[r].top_p, (double)ps[r].min_p,
                   (int)ps[r].n_logprobs, ps[r].u, why);
            ok = 0;
        }
        if (u_mode[r] == 3) *on_purpose += b;
        else *boundary += b;
    }
    gt_arena_free(&a);
    return ok;
}

/* Microseconds per call of mn_cuda_sample over rows rows of V logits with params p. */
static double sample_time(int32_t V, int rows, mn_sample_params p, cudaStream_t s) {
    float *hl = malloc((size_t)V * rows * sizeof *hl);
    mn_sample_params *hp = malloc((size_t)rows * sizeof *hp);
    sc_fill(hl, V, 4);
    for (int r = 1; r < rows; r++) memcpy(hl + (int64_t)r * V, hl, (size_t)V * sizeof *hl);
    for (int r = 0; r < rows; r++) { hp[r] = p; hp[r].u = sc_rand(); }
    float *dl = NULL, *dlp = NULL, *dtlp = NULL;
    mn_sample_params *dp = NULL;
    int32_t *dt = NULL, *dtid = NULL;
    double us = -1.0;
    mn_errbuf eb;
    if (cudaMalloc((void **)&dl, (size_t)V * rows * sizeof(float)) == cudaSuccess &&
        cudaMalloc((void **)&dp, (size_t)rows * sizeof *dp) == cudaSuccess &&
        cudaMalloc((void **)&dt, (size_t)rows * 4) == cudaSuccess && cudaMalloc((void **)&dlp, (size_t)rows * 4) == cudaSuccess &&
        cudaMalloc((void **)&dtid, (size_t)rows * GS_TOP * 4) == cudaSuccess &&
        cudaMalloc((void **)&dtlp, (size_t)rows * GS_TOP * 4) == cudaSuccess) {
        cudaMemcpy(dl, hl, (size_t)V * rows * sizeof(float), cudaMemcpyHostToDevice);
        cudaMemcpy(dp, hp, (size_t)rows * sizeof *dp, cudaMemcpyHostToDevice);
        mn_sample_desc d = {rows, V, dl, V, dp, dt, dlp, dtid, dtlp};
        cudaEvent_t e0, e1;
        cudaEventCreate(&e0);
        cudaEventCreate(&e1);
        mn_cuda_sample(&d, s, &eb); /* warm-up */
        cudaEventRecord(e0, s);
        enum { RUNS = 20 };
        for (int i = 0; i < RUNS; i++) mn_cuda_sample(&d, s, &eb);
        cudaEventRecord(e1, s);
        float ms = 0.0f;
        if (cudaEventSynchronize(e1) == cudaSuccess && cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess)
            us = 1000.0 * ms / RUNS;
        cudaEventDestroy(e0);
        cudaEventDestroy(e1);
    }
    cudaFree(dl); cudaFree(dp); cudaFree(dt); cudaFree(dlp); cudaFree(dtid); cudaFree(dtlp);
    free(hl);
    free(hp);
    return us;
}

int gt_sample(cudaStream_t s) {
    static const int32_t Vs[] = {1, 17, 1001, 4099, 50001, 128257};
    static const int batches[] = {4, 8, 8, 6, 3, 3};
    int all = 1;
    long rows = 0, boundary = 0, on_purpose = 0;
    for (size_t v = 0; v < sizeof Vs / sizeof Vs[0]; v++) {
        int ok = 1;
        for (int b = 0; b < batches[v]; b++) ok &= sample_batch(Vs[v], s, &rows, &boundary, &on_purpose);
        printf("sample    V %-6d %3d rows, parameter combinations and u boundaries   %s\n", (int)Vs[v],
               batches[v] * GS_ROWS, ok ? "ok" : "FAIL");
        all &= ok;
    }
    printf("sample    %ld rows, %ld boundary cases with u drawn freely, %ld with u put on a boundary (token differs "
           "from the reference within MN_SAMPLE_TOL)\n", rows, boundary, on_purpose);
    if (boundary * 100 > rows) {
        printf("sample    FAIL: more than 1%% boundary cases among rows with u drawn freely\n");
        all = 0;
    }
    mn_sample_params def = {0.8f, 40, 0.95f, 0.05f, 0.0, 0}, topp = {1.0f, 0, 0.9f, 0.0f, 0.0, 0},
                     greedy = {0.0f, 0, 1.0f, 0.0f, 0.0, 5};
    const int counts[3] = {1, 16, 64};
    for (int i = 0; i < 3; i++)
        printf("sample    V 128256 rows %-3d  us/call: defaults %8.1f  top-p 0.9 %8.1f  greedy+5 logprobs %8.1f\n",
               counts[i], sample_time(128256, counts[i], def, s), sample_time(128256, counts[i], topp, s),
               sample_time(128256, counts[i], greedy, s));
    return all;
}
