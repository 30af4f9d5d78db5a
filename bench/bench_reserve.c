/* bench/bench_reserve.c — turns that need room in the KV pool, with and without the reserve.
 *
 * N sessions of L tokens each take turns (append 4 tokens, generate 1) in a pool with room
 * for P of them, so every turn brings one session back from T1 and needs another one's
 * blocks. Without the reserve (kv_reserve off) the turn waits for that demotion's copy out
 * of the pool; with it the previous step already started the copy in the background. For
 * each setting: the turn times (median, p90, max, in ms) and the engine's counters over
 * the turns: demotions waited for, demotions only enqueued, waits for a copy in flight.
 * The sessions are imported from one computed session (same tokens, own blocks), so the
 * set-up costs one prefill.
 *   usage: bench_reserve [-m MODEL] [-t THREADS] [-n SESSIONS] [-p POOL_SESSIONS] [-r ROUNDS]
 *                        [-k RESERVE_BLOCKS] [L]
 *   defaults: 8 sessions, pool for 3, 4 rounds, L 1024, reserve: the engine's default
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/alloc.h"
#include "engine/session.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what, const mn_errbuf *eb) {
    fprintf(stderr, "bench_reserve: %s: %s\n", what, eb->msg);
    exit(1);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* One setting: the turn times into t[n * rounds]; the engine's counters over the turns
 * (the imports that fill the pool first are not counted) into st. */
static void run(mn_model *m, int32_t reserve, int n, int pool_sessions, int rounds, int32_t L, const uint8_t *img,
                size_t img_len, double *t, mn_engine_stats *st) {
    mn_errbuf eb;
    int32_t blocks_per = (L + 4 * rounds + 16 + 15) / 16 + 1;
    mn_engine_params ep = {.block_size = 16, .n_blocks = pool_sessions * blocks_per, .max_batch_tokens = 512,
                           .kv_reserve = reserve};
    mn_engine *e;
    if (mn_engine_new(m, &ep, &e, &eb) != MN_OK) die("engine", &eb);
    mn_session **ss = calloc((size_t)n, sizeof *ss);
    for (int i = 0; i < n; i++)
        if (mn_session_import(e, img, img_len, &ss[i], &eb) != MN_OK) die("import", &eb);
    mn_gen_params g = {0};
    g.sampling = mn_sampling_defaults();
    g.sampling.temperature = 0;
    g.max_tokens = 1;
    mn_engine_stats st0;
    mn_engine_stats_get(e, &st0);
    for (int r = 0; r < rounds; r++)
        for (int i = 0; i < n; i++) {
            int32_t toks[4];
            for (int k = 0; k < 4; k++) toks[k] = 500 + (r * 131 + i * 17 + k * 7) % 10000;
            double t0 = now_s();
            if (mn_session_append_tokens(e, ss[i], toks, 4, MN_ROLE_USER, &eb) != MN_OK) die("append", &eb);
            if (mn_session_generate(e, ss[i], &g, NULL, NULL, NULL, &eb) != MN_OK) die("generate", &eb);
            t[r * n + i] = now_s() - t0;
        }
    mn_engine_stats_get(e, st);
    st->demotions_waited -= st0.demotions_waited;
    st->demotions_background -= st0.demotions_background;
    st->drain_waits -= st0.drain_waits;
    for (int i = 0; i < n; i++) mn_session_delete(e, ss[i]);
    free(ss);
    mn_engine_free(e);
}

int main(int argc, char **argv) {
    const char *model_path = NULL;
    int threads = 0, n = 8, pool_sessions = 3, rounds = 4;
    int32_t L = 1024, reserve = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc) model_path = argv[++i];
        else if (!strcmp(argv[i], "-t") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-n") && i + 1 < argc) n = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-p") && i + 1 < argc) pool_sessions = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-r") && i + 1 < argc) rounds = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-k") && i + 1 < argc) reserve = atoi(argv[++i]);
        else L = atoi(argv[i]);
    }
    if (n < 2 || pool_sessions < 1 || rounds < 1 || L < 16) {
        fprintf(stderr, "bench_reserve: need -n >= 2, -p >= 1, -r >= 1, L >= 16\n");
        return 2;
    }
    if (!model_path) model_path = mn_model_default_path();
    mn_errbuf eb;
    mn_backend *be;
    mn_model *m;
    mn_backend_params bp = {.device = "cpu", .n_threads = threads};
    if (mn_backend_cpu_new(&bp, &be, &eb) != MN_OK) die("backend", &eb);
    if (mn_model_load(model_path, be, NULL, &m, &eb) != MN_OK) die(model_path, &eb);
    /* one computed session of L tokens, exported: every bench session is an import of it */
    uint8_t *img;
    size_t img_len;
    {
        mn_engine_params ep = {.block_size = 16, .n_blocks = (L + 15) / 16 + 8, .max_batch_tokens = 512};
        mn_engine *e;
        mn_session *s;
        if (mn_engine_new(m, &ep, &e, &eb) != MN_OK) die("engine", &eb);
        int32_t *toks = malloc((size_t)L * sizeof *toks);
        for (int32_t i = 0; i < L; i++) toks[i] = 200 + (i * 37) % 10000;
        if (mn_session_create(e, NULL, &s, &eb) != MN_OK) die("session", &eb);
        if (mn_session_append_tokens(e, s, toks, L, MN_ROLE_USER, &eb) != MN_OK) die("append", &eb);
        if (mn_session_export(e, s, &img, &img_len, &eb) != MN_OK) die("export", &eb);
        free(toks);
        mn_engine_free(e);
    }
    int turns = n * rounds;
    double *t = malloc((size_t)turns * sizeof *t);
    printf("%d sessions of %d tokens taking turns (append 4, generate 1), pool for %d, %d rounds\n", n, L,
           pool_sessions, rounds);
    printf("reserve  blocks  median_ms  p90_ms  max_ms  total_s  waited  background  drain_waits\n");
    for (int k = 0; k < 2; k++) {
        mn_engine_stats st;
        run(m, k ? reserve : MN_KV_RESERVE_OFF, n, pool_sessions, rounds, L, img, img_len, t, &st);
        double total = 0;
        for (int i = 0; i < turns; i++) total += t[i];
        qsort(t, (size_t)turns, sizeof *t, cmp_double);
        printf("%-7s  %6d  %9.2f  %6.2f  %6.2f  %7.2f  %6lld  %10lld  %11lld\n", k ? "on" : "off", st.blocks_reserve,
               t[turns / 2] * 1e3, t[turns * 9 / 10] * 1e3, t[turns - 1] * 1e3, total, (long long)st.demotions_waited,
               (long long)st.demotions_background, (long long)st.drain_waits);
    }
    free(t);
    mn_free(img);
    mn_model_free(m);
    mn_backend_free(be);
    return 0;
}
