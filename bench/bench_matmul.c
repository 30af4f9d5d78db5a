/* bench/bench_matmul.c — throughput of mn_cpu_matmul on SmolLM2-135M's shapes.
 *
 * Prints, per (weight type, N x K, T, threads): time per call, GB/s of weights streamed
 * (weight bytes / time; one pass over W per call) and GFLOP/s (2*T*N*K / time), and the
 * ratio of the weight GB/s to a read-bandwidth floor measured in the same run (a sum over
 * a 256 MiB buffer, 1 and 2 threads) — ratio ~1 means memory-bound at full speed;
 * above 1 means the weights came from cache.
 *
 * Build: ninja -C build bench_matmul.  Run: build/bench_matmul [seconds_per_case=0.12] [types]
 * With "types": instead, every weight type at N x K = 1536 x 1536, T = 1 and 64, one
 * thread, at every SIMD level the CPU has; "types-big": the quants at 4096 x 14336.
 * The output is checked against mn_ref_matmul on a few elements before timing.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/alloc.h"
#include "kernels/ops.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- a tiny persistent pool: all threads run job(ith) between two barriers ---------- */
typedef struct pool {
    int nth, quit;
    pthread_barrier_t start, done, op;
    void (*job)(struct pool *, int ith);
    const mn_matmul_desc *d;
    void *work;
    const uint64_t *buf; size_t nbuf; volatile uint64_t sink[8];
    pthread_t th[8];
} pool;
static pool P;

static void op_barrier(void *ctx) { pthread_barrier_wait((pthread_barrier_t *)ctx); }
static void job_matmul(pool *p, int ith) {
    mn_par par = {ith, p->nth, op_barrier, &p->op};
    mn_cpu_matmul(p->d, p->work, &par);
}
static void job_read(pool *p, int ith) {
    size_t per = p->nbuf / (size_t)p->nth, lo = per * (size_t)ith;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = lo; i + 4 <= lo + per; i += 4) { s0 += p->buf[i]; s1 += p->buf[i + 1]; s2 += p->buf[i + 2]; s3 += p->buf[i + 3]; }
    p->sink[ith] = s0 + s1 + s2 + s3;
}
static void *worker(void *arg) {
    int ith = (int)(intptr_t)arg;
    for (;;) {
        pthread_barrier_wait(&P.start);
        if (P.quit) return NULL;
        P.job(&P, ith);
        pthread_barrier_wait(&P.done);
    }
}
static void pool_start(int nth) {
    P.nth = nth; P.quit = 0;
    pthread_barrier_init(&P.start, NULL, (unsigned)nth);
    pthread_barrier_init(&P.done, NULL, (unsigned)nth);
    pthread_barrier_init(&P.op, NULL, (unsigned)nth);
    for (int i = 1; i < nth; i++) pthread_create(&P.th[i], NULL, worker, (void *)(intptr_t)i);
}
static void pool_run(void) {
    if (P.nth > 1) pthread_barrier_wait(&P.start);
    P.job(&P, 0);
    if (P.nth > 1) pthread_barrier_wait(&P.done);
}
static void pool_stop(void) {
    P.quit = 1;
    if (P.nth > 1) pthread_barrier_wait(&P.start);
    for (int i = 1; i < P.nth; i++) pthread_join(P.th[i], NULL);
    pthread_barrier_destroy(&P.start); pthread_barrier_destroy(&P.done); pthread_barrier_destroy(&P.op);
}

/* Seconds per pool_run, repeated for at least `budget` seconds (and 2 runs). */
static double time_runs(double budget) {
    pool_run(); /* warm-up */
    int it = 0;
    double t0 = now(), t;
    do { pool_run(); it++; t = now(); } while (t - t0 < budget || it < 2);
    return (t - t0) / it;
}

static uint32_t rs = 12345;
static uint32_t rnd(void) { rs = rs * 1664525u + 1013904223u; return rs >> 8; }

/* One weight matrix of type t (random bytes, scales 0.01), timed at T = 1 and 64.
 * big: an 8B model's FFN down shape (N x K = 4096 x 14336), the quants only, no scalar
 * level (the per-thread repack of a row group then spans K = 14336: L2 pressure). */
static int per_type(double budget, int big) {
    static const mn_dtype all[] = {MN_F32, MN_F16, MN_BF16, MN_Q4_0, MN_Q4_1, MN_Q5_0, MN_Q5_1, MN_Q8_0, MN_Q2_K, MN_Q3_K, MN_Q4_K, MN_Q5_K, MN_Q6_K};
    const mn_dtype *types = big ? all + 3 : all;
    const size_t ntypes = sizeof all / sizeof all[0] - (big ? 3 : 0);
    static const char *const levels[] = {"scalar", "avx2", "avx512", "avx512-vnni"};
    const int64_t N = big ? 4096 : 1536, K = big ? 14336 : 1536;
    float *x = mn_malloc(sizeof(float) * 64 * K), *y = mn_malloc(sizeof(float) * 64 * N);
    for (int64_t i = 0; i < 64 * K; i++) x[i] = (float)(rnd() % 2001) / 1000.0f - 1.0f;
    printf("%-12s %-5s %4s %10s %8s %8s\n", "level", "type", "T", "us/call", "W GB/s", "GFLOP/s");
    for (int l = 0; l < 4; l++) {
        if (!mn_cpu_set_simd(levels[l]) || (big && l == 0)) continue;
        for (size_t i = 0; i < ntypes; i++) {
            mn_dtype t = types[i];
            int64_t rb = mn_dtype_row_bytes(t, K), bb = mn_dtype_block_bytes(t);
            uint8_t *w = mn_malloc((size_t)(N * rb));
            for (int64_t j = 0; j < N * rb; j++) w[j] = (uint8_t)rnd();
            uint16_t h = mn_fp32_to_fp16(0.01f);
            if (bb == 4) for (int64_t j = 0; j < N * K; j++) ((float *)w)[j] = 0.01f;
            else if (bb == 2) for (int64_t j = 0; j < N * K; j++) ((uint16_t *)w)[j] = t == MN_F16 ? h : mn_fp32_to_bf16(0.01f);
            else for (int64_t b = 0; b < N * rb / bb; b++)
                memcpy(w + b * bb + (t == MN_Q6_K ? 208 : t == MN_Q3_K ? 108 : t == MN_Q2_K ? 80 : 0), &h, 2);
            for (int64_t T = 1; T <= 64; T *= 64) {
                mn_matmul_desc d = {.T = T, .N = N, .K = K, .x = x, .x_stride = K, .w = w, .w_type = t,
                                    .w_row_bytes = rb, .y = y, .y_stride = N};
                void *work = mn_malloc(mn_cpu_matmul_work_bytes(&d, 1) + 1);
                pool_start(1);
                P.job = job_matmul; P.d = &d; P.work = work;
                double sec = time_runs(l == 0 ? budget / 4 : budget);
                pool_stop();
                printf("%-12s %-5s %4lld %10.1f %8.1f %8.1f\n", levels[l], mn_dtype_name(t), (long long)T, sec * 1e6,
                       (double)(N * rb) / sec / 1e9, 2.0 * (double)(T * N * K) / sec / 1e9);
                fflush(stdout);
                mn_free(work);
            }
            mn_free(w);
        }
    }
    mn_free(x); mn_free(y);
    return 0;
}

int main(int argc, char **argv) {
    double budget = argc > 1 ? atof(argv[1]) : 0.12;
    mn_cpu_init();
    printf("mneme bench_matmul  simd=%s\n", mn_cpu_simd_name());

    /* read-bandwidth floor */
    double floor_gbs[3] = {0};
    size_t nbuf = (size_t)256 << 17; /* 256 MiB of u64 */
    uint64_t *buf = mn_malloc(nbuf * 8);
    for (size_t i = 0; i < nbuf; i++) buf[i] = i;
    for (int nth = 1; nth <= 2; nth++) {
        pool_start(nth);
        P.job = job_read; P.buf = buf; P.nbuf = nbuf;
        floor_gbs[nth] = (double)nbuf * 8 / time_runs(0.3) / 1e9;
        pool_stop();
        printf("read bandwidth floor, %d thread(s): %.1f GB/s\n", nth, floor_gbs[nth]);
    }
    double tc = now();
    memcpy(buf, buf + nbuf / 2, nbuf * 4);
    printf("memcpy 128 MiB, 1 thread: %.1f GB/s (read+write)\n", (double)nbuf * 8 / (now() - tc) / 1e9);
    mn_free(buf);

    if (argc > 2 && strcmp(argv[2], "types") == 0) return per_type(budget, 0);
    if (argc > 2 && strcmp(argv[2], "types-big") == 0) return per_type(budget, 1);
    static const struct { mn_dtype t; int64_t N, K; } shapes[] = {
        {MN_Q4_1, 576, 576}, {MN_Q4_1, 192, 576}, {MN_Q4_1, 1536, 576}, {MN_Q4_1, 576, 1536},
        {MN_Q8_0, 576, 576}, {MN_Q8_0, 192, 576}, {MN_Q8_0, 1536, 576}, {MN_Q8_0, 576, 1536},
        {MN_Q8_0, 49152, 576},
    };
    static const int64_t Ts[] = {1, 8, 512};
    printf("%-5s %6s %5s %4s %3s %10s %8s %8s %7s\n", "type", "N", "K", "T", "thr", "us/call", "W GB/s", "GFLOP/s", "xfloor");
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        mn_dtype t = shapes[s].t;
        int64_t N = shapes[s].N, K = shapes[s].K, rb = mn_dtype_row_bytes(t, K);
        uint8_t *w = mn_malloc((size_t)(N * rb));
        for (int64_t i = 0; i < N * rb; i++) w[i] = (uint8_t)rnd();
        for (int64_t b = 0; b < N * rb / mn_dtype_block_bytes(t); b++) { /* sane fp16 scales */
            uint16_t h = mn_fp32_to_fp16(0.01f);
            memcpy(w + b * mn_dtype_block_bytes(t), &h, 2);
            if (t == MN_Q4_1) memcpy(w + b * mn_dtype_block_bytes(t) + 2, &h, 2);
        }
        float *x = mn_malloc(sizeof(float) * (size_t)(512 * K)), *y = mn_malloc(sizeof(float) * (size_t)(512 * N));
        for (int64_t i = 0; i < 512 * K; i++) x[i] = (float)(rnd() % 2001) / 1000.0f - 1.0f;
        for (int ti = 0; ti < 3; ti++) {
            int64_t T = Ts[ti];
            mn_matmul_desc d = {.T = T, .N = N, .K = K, .x = x, .x_stride = K, .w = w, .w_type = t,
                                .w_row_bytes = rb, .y = y, .y_stride = N};
            for (int nth = 1; nth <= 2; nth++) {
                void *work = mn_malloc(mn_cpu_matmul_work_bytes(&d, nth));
                pool_start(nth);
                P.job = job_matmul; P.d = &d; P.work = work;
                double sec = time_runs(T == 512 && N > 10000 ? 0.0 : budget);
                pool_stop();
                if (nth == 1 && ti == 0) { /* a spot check against the reference */
                    float yr[8];
                    mn_matmul_desc dr = d;
                    dr.N = 8; dr.y = yr;
                    mn_ref_matmul(&dr);
                    for (int i = 0; i < 8; i++)
                        if (fabsf(yr[i] - y[i]) > 1e-3f * (1.0f + fabsf(yr[i]))) {
                            fprintf(stderr, "MISMATCH vs ref at n=%d: %g vs %g\n", i, y[i], yr[i]);
                            return 1;
                        }
                }
                double gbs = (double)(N * rb) / sec / 1e9, gflops = 2.0 * (double)(T * N * K) / sec / 1e9;
                printf("%-5s %6lld %5lld %4lld %3d %10.1f %8.1f %8.1f %7.2f\n", mn_dtype_name(t), (long long)N,
                       (long long)K, (long long)T, nth, sec * 1e6, gbs, gflops, gbs / floor_gbs[nth]);
                fflush(stdout);
                mn_free(work);
            }
        }
        mn_free(w); mn_free(x); mn_free(y);
    }
    return 0;
}
