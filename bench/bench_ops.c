/* bench/bench_ops.c — time the non-matmul ops of the forward pass on the CPU.
 *
 * Shapes are SmolLM2-135M's (n_embd 576, 9 heads / 3 KV heads, head_dim 64, ff 1536):
 *   attention, decode of one token and an append of 5 at context 512 / 2048 / 8192 (paged
 *   cache, block 16, shuffled block ids), and rmsnorm / silu_mul / rope at T = 1 and T = 512.
 * Each op runs on the engine's thread pool with 1 and 2 threads and prints microseconds
 * per call (mean over a time-boxed loop after one warm-up call). The kernels timed are
 * the same ones the engine calls; their correctness is checked by tests/unit/test_ops.c.
 * Usage: bench_ops [seconds_per_measurement [simd]]  (default 0.25 s and the best SIMD
 * level; simd one of scalar, avx2, avx512, avx512-vnni). The whole run takes ~5 s.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/alloc.h"
#include "engine/threadpool.h"
#include "kernels/ops.h"

enum { B_ATTN, B_RMSNORM, B_SILU, B_ROPE };

typedef struct bjob {
    int op;
    const void *desc;
    void *work; /* attention: mn_cpu_attention_work_bytes for 2 threads */
} bjob;

static void bjob_run(void *arg, const mn_par *par) {
    const bjob *j = arg;
    switch (j->op) {
    case B_ATTN: mn_cpu_attention(j->desc, j->work, par); break;
    case B_RMSNORM: mn_cpu_rmsnorm(j->desc, NULL, par); break;
    case B_SILU: mn_cpu_silu_mul(j->desc, NULL, par); break;
    case B_ROPE: mn_cpu_rope(j->desc, NULL, par); break;
    }
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double thread_cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Mean wall microseconds per call of job on pool over about `secs` seconds; *cpu_us gets
 * the calling thread's CPU time per call (with a 1-thread pool that is the whole op, and
 * it does not count time the scheduler gave to other processes on a busy machine). */
static double time_us(mn_threadpool *pool, bjob *job, double secs, double *cpu_us) {
    mn_threadpool_run(pool, bjob_run, job);
    long n = 0;
    double t0 = now_s(), c0 = thread_cpu_s(), t;
    do {
        mn_threadpool_run(pool, bjob_run, job);
        n++;
        t = now_s();
    } while (t - t0 < secs);
    if (cpu_us) *cpu_us = (thread_cpu_s() - c0) / (double)n * 1e6;
    return (t - t0) / (double)n * 1e6;
}

static uint64_t rng = 88172645463325252ull;
static float frand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)(rng >> 40) * 0x1p-24f * 2.0f - 1.0f;
}

static void *xalloc(size_t n) {
    void *p = mn_aligned_alloc(64, n);
    if (!p) {
        fprintf(stderr, "bench_ops: out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

static float *rand_f32(size_t n) {
    float *p = xalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = frand();
    return p;
}

int main(int argc, char **argv) {
    double secs = argc > 1 ? atof(argv[1]) : 0.25;
    if (secs <= 0) secs = 0.25;
    mn_cpu_init();
    if (argc > 2 && !mn_cpu_set_simd(argv[2])) {
        fprintf(stderr, "bench_ops: SIMD level '%s' not available on this CPU\n", argv[2]);
        return 1;
    }
    printf("bench_ops: simd=%s, %.2f s per measurement\n", mn_cpu_simd_name(), secs);
    mn_threadpool *pools[2];
    for (int i = 0; i < 2; i++) {
        mn_errbuf eb;
        if (mn_threadpool_new(i + 1, &pools[i], &eb) != MN_OK) {
            fprintf(stderr, "bench_ops: thread pool: %s\n", eb.msg);
            return 1;
        }
    }
    const int n_head = 9, n_kv = 3, hd = 64, bs = 16, D = 576, F = 1536;

    /* ---- attention decode: one sequence of ctx tokens, shuffled blocks ---- */
    printf("%-34s %12s %12s %12s\n", "op", "1 thread us", "(cpu us)", "2 threads us");
    /* decode (1 token) and a 5-token append, the cost of a turn on a long session */
    static const int ctxs[] = {512, 2048, 8192, 512, 2048, 8192};
    for (int ci = 0; ci < 6; ci++) {
        int ctx = ctxs[ci], nb = ctx / bs, T = ci < 3 ? 1 : 5;
        int64_t stride = (int64_t)bs * n_kv * hd;
        uint16_t *k = xalloc((size_t)(nb * stride) * 2), *v = xalloc((size_t)(nb * stride) * 2);
        for (int64_t i = 0; i < nb * stride; i++) {
            k[i] = mn_fp32_to_fp16(frand());
            v[i] = mn_fp32_to_fp16(frand());
        }
        int32_t *ind = xalloc((size_t)nb * sizeof(int32_t)), indptr[2] = {0, nb};
        for (int i = 0; i < nb; i++) ind[i] = i;
        for (int i = nb - 1; i > 0; i--) {
            int j = (int)(rng % (uint64_t)(i + 1)), tmp = ind[i];
            rng ^= rng << 13;
            ind[i] = ind[j];
            ind[j] = tmp;
        }
        float *q = rand_f32((size_t)T * n_head * hd), *out = rand_f32((size_t)T * n_head * hd);
        int32_t seq[5] = {0}, pos[5];
        for (int t = 0; t < T; t++) pos[t] = ctx - T + t;
        mn_attention_desc d = {.T = T, .n_head = n_head, .n_kv_head = n_kv, .head_dim = hd, .q = q,
                               .q_stride = n_head * hd, .seq = seq, .pos = pos, .scale = 0.125f, .out = out,
                               .out_stride = n_head * hd};
        d.kv = (mn_kv_view){.k = k, .v = v, .block_stride = stride, .block_size = bs, .n_kv_head = n_kv,
                            .head_dim = hd, .block_indptr = indptr, .block_indices = ind};
        size_t wb = mn_cpu_attention_work_bytes(&d, 2);
        void *work = wb ? xalloc(wb) : NULL;
        bjob job = {B_ATTN, &d, work};
        char name[64];
        snprintf(name, sizeof name, "attention %s ctx=%d", T == 1 ? "decode" : "append 5", ctx);
        double c1, t1 = time_us(pools[0], &job, secs, &c1), t2 = time_us(pools[1], &job, secs, NULL);
        printf("%-34s %12.1f %12.1f %12.1f\n", name, t1, c1, t2);
        if (work) mn_free(work);
        mn_free(k);
        mn_free(v);
        mn_free(ind);
        mn_free(q);
        mn_free(out);
    }

    /* ---- elementwise / norm / rope at T = 1 and T = 512 ---- */
    static const int Ts[] = {1, 512};
    for (int ti = 0; ti < 2; ti++) {
        int T = Ts[ti];
        float *x = rand_f32((size_t)T * F), *y = rand_f32((size_t)T * F), *u = rand_f32((size_t)T * F);
        float *w = rand_f32(D), inv[32];
        for (int i = 0; i < 32; i++) inv[i] = 1.0f / (float)(1 + i);
        int32_t *pos = xalloc((size_t)T * sizeof(int32_t));
        for (int t = 0; t < T; t++) pos[t] = t;
        mn_rmsnorm_desc rn = {.T = T, .D = D, .x = x, .x_stride = D, .w = w, .eps = 1e-5f, .y = y, .y_stride = D};
        mn_silu_mul_desc sm = {.T = T, .F = F, .gate = x, .gate_stride = F, .up = u, .up_stride = F, .y = y, .y_stride = F};
        mn_rope_desc rp = {.T = T, .n_head = n_head, .head_dim = hd, .n_rot = hd, .mode = MN_ROPE_NORM, .x = y,
                           .x_stride = n_head * hd, .pos = pos, .inv_freq = inv, .attn_factor = 1.0f};
        struct { const char *name; bjob job; } jobs[] = {
            {"rmsnorm D=576", {B_RMSNORM, &rn, NULL}}, {"silu_mul F=1536", {B_SILU, &sm, NULL}}, {"rope 9x64", {B_ROPE, &rp, NULL}}};
        for (int j = 0; j < 3; j++) {
            char name[64];
            snprintf(name, sizeof name, "%s T=%d", jobs[j].name, T);
            double c1, t1 = time_us(pools[0], &jobs[j].job, secs, &c1);
            double t2 = time_us(pools[1], &jobs[j].job, secs, NULL);
            printf("%-34s %12.1f %12.1f %12.1f\n", name, t1, c1, t2);
        }
        mn_free(x);
        mn_free(y);
        mn_free(u);
        mn_free(w);
        mn_free(pos);
    }
    for (int i = 0; i < 2; i++) mn_threadpool_free(pools[i]);
    return 0;
}
