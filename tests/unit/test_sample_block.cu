/* tests/unit/test_sample_block.cu — the CUDA sample kernel's own block code run on the CPU
 * (no GPU).
 *
 * nvcc compiles this file, but only host code runs: the device kernel of
 * kernels/cuda/sample.cu is a thin wrapper (which row) around mn__sample_row of
 * kernels/cuda/sample_block.cuh, a __host__ __device__ template over the block. Here the
 * block is NT host threads (32 by default; 64, 128 and the device's 512 too) in lockstep: sync() is a
 * pthread barrier over all of them, atomic_add a locked add on the shared area (in
 * whatever order the threads arrive, as on the device). Each thread runs exactly the
 * code a GPU thread runs: the radix selects, the scans, the draw.
 *
 * Cases: odd vocabularies 1 .. 128257, the six logit kinds of sample_check.h (ties, -inf
 * and NaN, all equal, +-0.0, peaked), random parameter combinations covering greedy,
 * top_k (1, 2, 40, V-1, V, > V), top_p, min_p and n_logprobs, u = 0, 1 - 2^-53, random and
 * exactly on a cumulative boundary, rows batched with a stride. Each row must agree with
 * mn_ref_sample as sample_check.h's sc_check allows (the ops.h contract's boundary
 * tolerance); the number of boundary cases is printed and must stay under 1%.
 * Self-contained (no cmocka): exits 1 on any failure.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "kernels/ops.h"
}
#include "kernels/cuda/sample_block.cuh"
#include "sample_check.h"

static pthread_mutex_t atomic_mu = PTHREAD_MUTEX_INITIALIZER;

struct host_block {
    int t, nthr;
    pthread_barrier_t *bar;
    int tid() const { return t; }
    int n() const { return nthr; }
    void sync() const { pthread_barrier_wait(bar); }
    void atomic_add(double *p, double v) const {
        pthread_mutex_lock(&atomic_mu);
        *p += v;
        pthread_mutex_unlock(&atomic_mu);
    }
};

struct thread_job {
    host_block b;
    const mn_sample_desc *d;
    mn__smp_smem *sh;
};

static void *thread_main(void *arg) {
    const thread_job *j = (const thread_job *)arg;
    for (int32_t r = 0; r < j->d->n_rows; r++) mn__sample_row(*j->d, r, j->sh, j->b);
    return NULL;
}

/* The kernel's work for every row of d on a block of nt host threads. */
static void run_block(const mn_sample_desc *d, int nt) {
    static mn__smp_smem sh;
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, (unsigned)nt);
    thread_job jobs[MN__SMP_MAX_THREADS];
    pthread_t th[MN__SMP_MAX_THREADS];
    for (int t = 0; t < nt; t++) {
        jobs[t].b.t = t;
        jobs[t].b.nthr = nt;
        jobs[t].b.bar = &bar;
        jobs[t].d = d;
        jobs[t].sh = &sh;
        if (t > 0 && pthread_create(&th[t], NULL, thread_main, &jobs[t]) != 0) {
            fprintf(stderr, "pthread_create failed\n");
            exit(1);
        }
    }
    thread_main(&jobs[0]);
    for (int t = 1; t < nt; t++) pthread_join(th[t], NULL);
    pthread_barrier_destroy(&bar);
}

enum { ROWS = 6, TOP = MN_SAMPLE_MAX_TOP };
static long n_rows_checked, n_boundary, n_fail;

static void run_batch(int32_t V, int nt) {
    int64_t stride = (int64_t)V + 5;
    float *l = (float *)malloc((size_t)(stride * ROWS) * sizeof *l);
    mn_sample_params ps[ROWS];
    for (int r = 0; r < ROWS; r++) {
        sc_fill(l + r * stride, V, (int)(sc_rand() * SC_KINDS));
        ps[r] = sc_params((int)(sc_rand() * SC_NPARAMS), V);
        ps[r].u = sc_u((int)(sc_rand() * 4), l + r * stride, V, &ps[r]);
    }
    int32_t tok[2][ROWS], tid[2][ROWS * TOP];
    float lp[2][ROWS], tlp[2][ROWS * TOP];
    mn_sample_desc d = {ROWS, V, l, stride, ps, tok[0], lp[0], tid[0], tlp[0]};
    mn_ref_sample(&d);
    d.token = tok[1]; d.logprob = lp[1]; d.top_id = tid[1]; d.top_logprob = tlp[1];
    run_block(&d, nt);
    for (int r = 0; r < ROWS; r++) {
        char why[200];
        int boundary;
        n_rows_checked++;
        if (!sc_check(l + r * stride, V, &ps[r], tok[1][r], &lp[1][r], tid[1] + r * TOP, tlp[1] + r * TOP, tok[0][r],
                      tid[0] + r * TOP, why, sizeof why, &boundary)) {
            if (n_fail++ < 10)
                printf("FAIL block %d V %d row %d (T %g k %d p %g min_p %g n %d u %.17g): %s\n", nt, (int)V, r,
                       (double)ps[r].temperature, (int)ps[r].top_k, (double)ps[r].top_p, (double)ps[r].min_p,
                       (int)ps[r].n_logprobs, ps[r].u, why);
        }
        n_boundary += boundary;
    }
    free(l);
}

int main(void) {
    static const int32_t Vs[] = {1, 2, 3, 17, 100, 1001, 4099, 50001, 128257};
    static const int batches[] = {60, 60, 60, 60, 60, 40, 12, 4, 3};
    for (size_t v = 0; v < sizeof Vs / sizeof Vs[0]; v++) {
        long before = n_fail;
        for (int b = 0; b < batches[v]; b++) run_batch(Vs[v], 32);
        printf("sample block (32 threads) V %-6d %3d rows  %s\n", (int)Vs[v], batches[v] * ROWS,
               n_fail == before ? "ok" : "FAIL");
    }
    for (int nt = 64; nt <= 128; nt *= 2) {
        long before = n_fail;
        for (int b = 0; b < 6; b++) run_batch(b < 3 ? 1001 : 4099, nt);
        run_batch(50001, nt);
        printf("sample block (%d threads) V 1001, 4099, 50001  %s\n", nt, n_fail == before ? "ok" : "FAIL");
    }
    {   /* the device's block size, once (512 host threads are slow in lockstep) */
        long before = n_fail;
        run_batch(4099, MN__SMP_MAX_THREADS);
        printf("sample block (%d threads) V 4099  %s\n", MN__SMP_MAX_THREADS, n_fail == before ? "ok" : "FAIL");
    }
    printf("sample block: %ld rows, %ld boundary cases, %ld failures\n", n_rows_checked, n_boundary, n_fail);
    if (n_boundary * 100 > n_rows_checked) {
        printf("FAIL: more than 1%% boundary cases\n");
        return 1;
    }
    return n_fail ? 1 : 0;
}
