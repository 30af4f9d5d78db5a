/* bench/bench_session.c — what a resident session saves.
 *
 * For each history length L (default 512, 2048; add more as arguments, e.g. 8192):
 *   resident  append 5 tokens to a session that already holds L tokens, then the first
 *             generated token (time to first token of a new turn)
 *   recompute the same L+5 tokens into a new session (what a stateless server does),
 *             then the first token
 *   new       append 5 tokens to an empty session, then the first token
 *   T1/T2/T3  the session demoted to that tier first (host image, lz4 host bytes, file
 *             in the page cache), so the turn includes bringing its KV back
 * and prints ms, the ratios to resident, the restore GB/s and the T2 compression ratio.
 * and the append-only cost (5 tokens, no generation) of the resident session against a new
 * one: appending to a long session should cost about what appending to a short one does.
 *   usage: bench_session [-m MODEL] [-t THREADS] [--quick] [--no-recompute] [L ...]
 *   --quick         resident and new only (skips the tiers and the recompute)
 *   --no-recompute  skips the recompute (68 s at 8K on one core)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/session.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what, const mn_errbuf *eb) {
    fprintf(stderr, "bench_session: %s: %s\n", what, eb->msg);
    exit(1);
}

/* append n tokens then generate one greedy token; returns seconds */
static double turn(mn_engine *e, mn_session *s, const int32_t *toks, int32_t n) {
    mn_errbuf eb;
    mn_gen_params g = {0};
    g.sampling = mn_sampling_defaults();
    g.sampling.temperature = 0;
    g.max_tokens = 1;
    double t0 = now_s();
    if (mn_session_append_tokens(e, s, toks, n, MN_ROLE_USER, &eb) != MN_OK) die("append", &eb);
    if (mn_session_generate(e, s, &g, NULL, NULL, NULL, &eb) != MN_OK) die("generate", &eb);
    return now_s() - t0;
}

/* append n tokens (computed, no generation); returns seconds */
static double append_only(mn_engine *e, mn_session *s, const int32_t *toks, int32_t n) {
    mn_errbuf eb;
    double t0 = now_s();
    if (mn_session_append_tokens(e, s, toks, n, MN_ROLE_USER, &eb) != MN_OK) die("append", &eb);
    return now_s() - t0;
}

int main(int argc, char **argv) {
    const char *model_path = NULL;
    int threads = 0;
    int32_t lens[16];
    int n_lens = 0, quick = 0, no_recompute = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) quick = 1;
        else if (!strcmp(argv[i], "--no-recompute")) no_recompute = 1;
        else if (!strcmp(argv[i], "-m") && i + 1 < argc) model_path = argv[++i];
        else if (!strcmp(argv[i], "-t") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (n_lens < 16) lens[n_lens++] = atoi(argv[i]);
    }
    if (!n_lens) { lens[0] = 512; lens[1] = 2048; n_lens = 2; }
    static char def[4096];
    if (!model_path) {
        snprintf(def, sizeof def, "%s/.cache/mneme/SmolLM2-135M-Instruct.Q4_1.gguf", getenv("HOME"));
        model_path = getenv("MNEME_MODEL") ? getenv("MNEME_MODEL") : def;
    }
    mn_errbuf eb;
    mn_backend *be;
    mn_model *m;
    mn_backend_params bp = {.device = "cpu", .n_threads = threads};
    if (mn_backend_cpu_new(&bp, &be, &eb) != MN_OK) die("backend", &eb);
    if (mn_model_load(model_path, be, NULL, &m, &eb) != MN_OK) die(model_path, &eb);
    int32_t max_len = 0;
    for (int i = 0; i < n_lens; i++) max_len = lens[i] > max_len ? lens[i] : max_len;
    char dir[] = "/tmp/mneme-bench-session-XXXXXX";
    if (!mkdtemp(dir)) { perror("mkdtemp"); return 1; }
    mn_engine_params ep = {.block_size = 16, .n_blocks = 3 * (max_len / 16 + 8), .max_batch_tokens = 512, .persist_dir = dir};
    mn_engine *e;
    if (mn_engine_new(m, &ep, &e, &eb) != MN_OK) die("engine", &eb);
    int32_t *toks = malloc((size_t)(max_len + 16) * sizeof(int32_t));
    for (int32_t i = 0; i < max_len + 16; i++) toks[i] = 100 + (int32_t)((i * 7919u) % 40000u);
    double appends[16][2];
    printf("%7s %9s %8s %8s %8s %8s %10s %7s %7s %7s %9s %6s %6s %6s %7s\n", "history", "resident", "T1", "T2", "T3",
           "new", "recompute", "T1/res", "T2/res", "T3/res", "recomp/T1", "T1GB/s", "T2GB/s", "T3GB/s", "lz4");
    for (int li = 0; li < n_lens; li++) {
        int32_t L = lens[li];
        mn_session *s, *fresh, *blank;
        if (mn_session_create(e, NULL, &s, &eb) != MN_OK) die("create", &eb);
        if (mn_session_append_tokens(e, s, toks, L, MN_ROLE_USER, &eb) != MN_OK) die("prefill", &eb);
        double best_res = 1e9, best_new = 1e9, app_res = 1e9, app_new = 1e9;
        for (int r = 0; r < 3; r++) {
            int32_t n0;
            mn_session_tokens(s, NULL, &n0);
            double t = turn(e, s, toks + L, 5);
            best_res = t < best_res ? t : best_res;
            if (mn_session_rewind(e, s, n0, &eb) != MN_OK) die("rewind", &eb);
            if (mn_session_create(e, NULL, &blank, &eb) != MN_OK) die("create", &eb);
            t = turn(e, blank, toks + L, 5);
            best_new = t < best_new ? t : best_new;
            mn_session_delete(e, blank);
            /* append only */
            t = append_only(e, s, toks + L, 5);
            app_res = t < app_res ? t : app_res;
            if (mn_session_rewind(e, s, n0, &eb) != MN_OK) die("rewind", &eb);
            if (mn_session_create(e, NULL, &blank, &eb) != MN_OK) die("create", &eb);
            t = append_only(e, blank, toks + L, 5);
            app_new = t < app_new ? t : app_new;
            mn_session_delete(e, blank);
        }
        appends[li][0] = app_res;
        appends[li][1] = app_new;
        if (quick) {
            printf("%7d %9.2f %8s %8s %8s %8.2f %10s %7s %7s %7s %9s %6s %6s %6s %7s\n", L, best_res * 1e3, "-", "-", "-",
                   best_new * 1e3, "-", "-", "-", "-", "-", "-", "-", "-", "-");
            mn_session_delete(e, s);
            continue;
        }
        /* the same turn after a demotion to each tier (best of 3) */
        double tier_ms[4] = {0};
        double ratio = 0;
        mn_session_info info;
        mn_session_info_get(e, s, &info);
        double raw_bytes = (double)info.kv_bytes;
        for (int t = 1; t <= 3; t++) {
            double best = 1e9;
            for (int r = 0; r < 3; r++) {
                int32_t n0;
                mn_session_tokens(s, NULL, &n0);
                if (mn_session_demote(e, s, t, &eb) != MN_OK) die("demote", &eb);
                if (t == 2) {
                    mn_session_info i2;
                    mn_session_info_get(e, s, &i2);
                    ratio = (double)i2.kv_bytes / raw_bytes;
                }
                double tt = turn(e, s, toks + L, 5);
                best = tt < best ? tt : best;
                if (mn_session_rewind(e, s, n0, &eb) != MN_OK) die("rewind", &eb);
            }
            tier_ms[t] = best;
        }
        /* recompute: distinct tokens so the prefix cache cannot help */
        int32_t *other = malloc((size_t)(L + 5) * sizeof(int32_t));
        for (int32_t i = 0; i < L + 5; i++) other[i] = 100 + (int32_t)((i * 104729u + 17) % 40000u);
        double rec = 0;
        if (!no_recompute) {
            if (mn_session_create(e, NULL, &fresh, &eb) != MN_OK) die("create", &eb);
            rec = turn(e, fresh, other, L + 5);
            mn_session_delete(e, fresh);
        }
        mn_session_delete(e, s);
        free(other);
        double gbs[4];
        for (int t = 1; t <= 3; t++) {
            double extra = tier_ms[t] - best_res;
            gbs[t] = extra > 1e-6 ? raw_bytes / extra / 1e9 : 0;
        }
        printf("%7d %9.2f %8.2f %8.2f %8.2f %8.2f %10.1f %7.2f %7.2f %7.2f %9.0f %6.1f %6.1f %6.1f %7.3f\n", L, best_res * 1e3,
               tier_ms[1] * 1e3, tier_ms[2] * 1e3, tier_ms[3] * 1e3, best_new * 1e3, rec * 1e3, tier_ms[1] / best_res,
               tier_ms[2] / best_res, tier_ms[3] / best_res, rec / tier_ms[1], gbs[1], gbs[2], gbs[3], ratio);
        fflush(stdout);
    }
    printf("\nappend 5 tokens, no generation (ms, best of 3)\n%7s %9s %8s %8s\n", "history", "resident", "new", "res/new");
    for (int li = 0; li < n_lens; li++)
        printf("%7d %9.2f %8.2f %8.2f\n", lens[li], appends[li][0] * 1e3, appends[li][1] * 1e3, appends[li][0] / appends[li][1]);
    mn_engine_stats st;
    mn_engine_stats_get(e, &st);
    printf("KV bytes per token: %lld (f16); GB/s = raw KV bytes / (tier turn - resident turn)\n", (long long)st.bytes_per_token);
    free(toks);
    mn_engine_free(e);
    rmdir(dir);
    mn_model_free(m);
    mn_backend_free(be);
    return 0;
}
