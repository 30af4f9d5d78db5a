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
 *   usage: bench_session [-m MODEL] [-t THREADS] [--quick] [--no-recompute] [--split] [--sync] [L ...]
 *   --sync          only the blocking restore from T2 / T3 (sync_restores below)
 *   --quick         resident and new only (skips the tiers and the recompute)
 *   --no-recompute  skips the recompute (68 s at 8K on one core)
 *   --split  then, for each L, where a T3 turn's time goes: the same stream saved to a file
 *            in the page cache, its pieces timed one by one through the public calls (best of
 *            5 each): pread of the whole file, the checksum over it, the byte unshuffle, LZ4
 *            (read_mem - checksum - unshuffle), first touch of a fresh image-sized buffer,
 *            mn_session_read_file (all of the worker's lift), the copy into the pool
 *            (mn_session_load - read_file) and the compute (the resident turn, and its
 *            append-only part); next to them the T1 and T3 turns measured at the same time, and
 *            when their token callback saw the first token (before that token's KV is computed).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "engine/alloc.h"
#include "engine/kvcodec.h"
#include "engine/session.h"
#include "engine/session_file.h"

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

/* the token callback of turn_ttft: when the first token was sampled and handed out */
static bool first_cb(void *ud, int32_t token, const char *text, size_t len, const mn_sample_info *info) {
    double *t = ud;
    if (*t == 0) *t = now_s();
    return true;
}

/* turn(), and *first = seconds until the token callback saw the first token (what a
 * streaming client gets as its first token; turn() also counts that token's KV) */
static double turn_ttft(mn_engine *e, mn_session *s, const int32_t *toks, int32_t n, double *first) {
    mn_errbuf eb;
    mn_gen_params g = {0};
    g.sampling = mn_sampling_defaults();
    g.sampling.temperature = 0;
    g.max_tokens = 1;
    double t_first = 0, t0 = now_s();
    if (mn_session_append_tokens(e, s, toks, n, MN_ROLE_USER, &eb) != MN_OK) die("append", &eb);
    if (mn_session_generate(e, s, &g, first_cb, &t_first, NULL, &eb) != MN_OK) die("generate", &eb);
    double t = now_s() - t0;
    *first = t_first - t0;
    return t;
}

/* append n tokens (computed, no generation); returns seconds */
static double append_only(mn_engine *e, mn_session *s, const int32_t *toks, int32_t n) {
    mn_errbuf eb;
    double t0 = now_s();
    if (mn_session_append_tokens(e, s, toks, n, MN_ROLE_USER, &eb) != MN_OK) die("append", &eb);
    return now_s() - t0;
}

static double mind(double a, double b) { return a < b ? a : b; }

/* pread all of path into buf (len bytes); returns seconds */
static double read_whole(const char *path, uint8_t *buf, size_t len) {
    double t0 = now_s();
    int fd = open(path, O_RDONLY);
    if (fd < 0) { perror(path); exit(1); }
    for (size_t got = 0; got < len;) {
        ssize_t r = pread(fd, buf + got, len - got, (off_t)got);
        if (r <= 0) { perror("pread"); exit(1); }
        got += (size_t)r;
    }
    close(fd);
    return now_s() - t0;
}

enum { SPLIT_REPS = 5 };

/* --split: the pieces of a T3 turn at history L, best of SPLIT_REPS each (see the top comment). */
static void split(mn_engine *e, const int32_t *toks, int32_t L, const char *dir, int64_t bytes_per_token, int32_t bs) {
    mn_errbuf eb;
    mn_session *s, *s2;
    if (mn_session_create(e, NULL, &s, &eb) != MN_OK) die("create", &eb);
    if (mn_session_append_tokens(e, s, toks, L, MN_ROLE_USER, &eb) != MN_OK) die("prefill", &eb);
    char path[4200];
    snprintf(path, sizeof path, "%s/split.mns", dir);
    if (mn_session_save(e, s, path, &eb) != MN_OK) die("save", &eb);
    struct stat st;
    if (stat(path, &st) != 0) { perror(path); exit(1); }
    size_t flen = (size_t)st.st_size;
    size_t n_blocks = (size_t)(L + bs - 1) / bs, chunk = (size_t)bs * (size_t)bytes_per_token, raw = n_blocks * chunk;
    uint8_t *fbuf = malloc(flen), *a = malloc(raw), *b = malloc(raw);
    if (!fbuf || !a || !b) { fprintf(stderr, "bench_session: out of memory\n"); exit(1); }
    memset(a, 1, raw);
    memset(b, 0, raw);
    double t_read = 1e9, t_hash = 1e9, t_unshuf = 1e9, t_mem = 1e9, t_file = 1e9, t_load = 1e9, t_touch = 1e9,
           t_retouch = 1e9, t_res = 1e9, t_app = 1e9, t_t1 = 1e9, t_t3 = 1e9, f_res = 1e9, f_t1 = 1e9, f_t3 = 1e9;
    volatile uint64_t sink = 0;
    for (int r = 0; r < SPLIT_REPS; r++) {
        t_read = mind(t_read, read_whole(path, fbuf, flen));
        double t0 = now_s();
        sink += mn_hash64(fbuf, flen, 0);
        t_hash = mind(t_hash, now_s() - t0);
        t0 = now_s();
        for (size_t c = 0; c < n_blocks; c++) mn_kvcodec_unshuffle(a + c * chunk, b + c * chunk, chunk);
        t_unshuf = mind(t_unshuf, now_s() - t0);
        mn_session_loaded *ld;
        t0 = now_s();
        if (mn_session_read_mem(fbuf, flen, NULL, &ld, &eb) != MN_OK) die("read_mem", &eb);
        t_mem = mind(t_mem, now_s() - t0);
        mn_session_loaded_free(ld);
        t0 = now_s();
        if (mn_session_read_file(path, NULL, &ld, &eb) != MN_OK) die("read_file", &eb);
        t_file = mind(t_file, now_s() - t0);
        mn_session_loaded_free(ld);
        /* a fresh image-sized buffer, as every read allocates one: first touch vs a second */
        uint8_t *f = mn_aligned_alloc(64, raw);
        if (!f) { fprintf(stderr, "bench_session: out of memory\n"); exit(1); }
        t0 = now_s();
        memset(f, 2, raw);
        t_touch = mind(t_touch, now_s() - t0);
        t0 = now_s();
        memset(f, 3, raw);
        t_retouch = mind(t_retouch, now_s() - t0);
        sink += f[raw / 2];
        mn_free(f);
        t0 = now_s();
        if (mn_session_load(e, path, &s2, &eb) != MN_OK) die("load", &eb);
        t_load = mind(t_load, now_s() - t0);
        mn_session_delete(e, s2);
        /* the turns, now */
        int32_t n0;
        mn_session_tokens(s, NULL, &n0);
        double ft;
        t_res = mind(t_res, turn_ttft(e, s, toks + L, 5, &ft));
        f_res = mind(f_res, ft);
        if (mn_session_rewind(e, s, n0, &eb) != MN_OK) die("rewind", &eb);
        t_app = mind(t_app, append_only(e, s, toks + L, 5));
        if (mn_session_rewind(e, s, n0, &eb) != MN_OK) die("rewind", &eb);
        for (int t = 1; t <= 3; t += 2) {
            if (mn_session_demote(e, s, t, &eb) != MN_OK) die("demote", &eb);
            double tt = turn_ttft(e, s, toks + L, 5, &ft);
            if (t == 1) t_t1 = mind(t_t1, tt), f_t1 = mind(f_t1, ft);
            else t_t3 = mind(t_t3, tt), f_t3 = mind(f_t3, ft);
            if (mn_session_rewind(e, s, n0, &eb) != MN_OK) die("rewind", &eb);
        }
    }
    (void)sink;
    double lz4 = t_mem - t_hash - t_unshuf, into_pool = t_load - t_file, sum = t_file + into_pool + t_res;
    printf("\nT3 turn split at L=%d (ms, best of %d): file %.2f MB, raw KV %.2f MB in %zu chunks\n", L, SPLIT_REPS, flen / 1e6,
           raw / 1e6, n_blocks);
    printf("  %-52s %8.2f  (%.1f GB/s)\n", "pread of the whole file (page cache -> user)", t_read * 1e3, flen / t_read / 1e9);
    printf("  %-52s %8.2f  (%.1f GB/s)\n", "checksum (mn_hash64 = XXH3 over the whole file)", t_hash * 1e3, flen / t_hash / 1e9);
    printf("  %-52s %8.2f  (%.1f GB/s)\n", "byte unshuffle (all chunks, warm buffers)", t_unshuf * 1e3, raw / t_unshuf / 1e9);
    printf("  %-52s %8.2f  (%.1f GB/s)\n", "first touch of a fresh image-sized buffer", t_touch * 1e3, raw / t_touch / 1e9);
    printf("  %-52s %8.2f\n", "  (the same memset on touched pages)", t_retouch * 1e3);
    printf("  %-52s %8.2f\n", "read_mem (checksums + LZ4 + unshuffle + image alloc)", t_mem * 1e3);
    printf("  %-52s %8.2f\n", "  => LZ4 + alloc/touch (read_mem - checksum - unshuffle)", lz4 * 1e3);
    printf("  %-52s %8.2f  (%.1f GB/s of raw KV)\n", "A read_file (the worker's lift: all of the above)", t_file * 1e3,
           raw / t_file / 1e9);
    printf("  %-52s %8.2f\n", "B into the pool (mn_session_load - read_file)", into_pool * 1e3);
    printf("  %-52s %8.2f\n", "C compute: resident turn (append 5 + generate 1)", t_res * 1e3);
    printf("  %-52s %8.2f\n", "    of which append 5 (no generation)", t_app * 1e3);
    printf("  %-52s %8.2f\n", "    of which generate 1 (sample + the token's KV)", (t_res - t_app) * 1e3);
    printf("  %-52s %8.2f\n", "A + B + C", sum * 1e3);
    printf("  %-52s %8.2f  (T1 - resident %.2f)\n", "T1 turn measured", t_t1 * 1e3, (t_t1 - t_res) * 1e3);
    printf("  %-52s %8.2f  (T3 - resident %.2f, T3 - (A+B+C) %.2f)\n", "T3 turn measured", t_t3 * 1e3,
           (t_t3 - t_res) * 1e3, (t_t3 - sum) * 1e3);
    printf("  first token handed out (token callback), not counting its KV: resident %.2f, T1 %.2f, T3 %.2f\n",
           f_res * 1e3, f_t1 * 1e3, f_t3 * 1e3);
    fflush(stdout);
    unlink(path);
    free(fbuf);
    free(a);
    free(b);
    mn_session_delete(e, s);
}

/* --sync: a blocking promotion (what fork, rewind, save and export do) from T2 and T3,
 * through a host image and then the pool (MNEME_RESTORE_VIA_IMAGE=1) against straight into
 * the pool blocks, interleaved, best of 7 each. */
static int sync_restores(mn_model *m, const int32_t *lens, int n_lens, int32_t max_len) {
    mn_errbuf eb;
    char dir[] = "/tmp/mneme-bench-sync-XXXXXX";
    if (!mkdtemp(dir)) { perror("mkdtemp"); return 1; }
    mn_engine_params ep = {.block_size = 16, .n_blocks = 3 * (max_len / 16 + 8), .max_batch_tokens = 512, .persist_dir = dir};
    mn_engine *e;
    if (mn_engine_new(m, &ep, &e, &eb) != MN_OK) die("engine", &eb);
    int32_t *toks = malloc((size_t)max_len * sizeof(int32_t));
    for (int32_t i = 0; i < max_len; i++) toks[i] = 100 + (int32_t)((i * 7919u) % 40000u);
    printf("blocking restore (fork of a demoted session), ms, best of 7\n%7s %4s %10s %10s %7s\n", "history", "tier",
           "via image", "into pool", "ratio");
    for (int li = 0; li < n_lens; li++) {
        mn_session *s, *fk;
        if (mn_session_create(e, NULL, &s, &eb) != MN_OK) die("create", &eb);
        if (mn_session_append_tokens(e, s, toks, lens[li], MN_ROLE_USER, &eb) != MN_OK) die("prefill", &eb);
        for (int tier = 2; tier <= 3; tier++) {
            double best[2] = {1e9, 1e9};
            for (int r = 0; r < 14; r++) {
                int via = r % 2 == 0;
                setenv("MNEME_RESTORE_VIA_IMAGE", via ? "1" : "0", 1);
                if (mn_session_demote(e, s, tier, &eb) != MN_OK) die("demote", &eb);
                double t0 = now_s() * 1e3;
                if (mn_session_fork(e, s, &fk, &eb) != MN_OK) die("fork", &eb);
                double t = now_s() * 1e3 - t0;
                mn_session_delete(e, fk);
                if (t < best[via ? 0 : 1]) best[via ? 0 : 1] = t;
            }
            printf("%7d   T%d %10.2f %10.2f %7.2f\n", lens[li], tier, best[0], best[1], best[0] / best[1]);
        }
        mn_session_delete(e, s);
    }
    unsetenv("MNEME_RESTORE_VIA_IMAGE");
    mn_engine_free(e);
    free(toks);
    rmdir(dir);
    return 0;
}

int main(int argc, char **argv) {
    const char *model_path = NULL;
    int threads = 0;
    int32_t lens[16];
    int n_lens = 0, quick = 0, no_recompute = 0, do_split = 0, do_sync = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) quick = 1;
        else if (!strcmp(argv[i], "--no-recompute")) no_recompute = 1;
        else if (!strcmp(argv[i], "--split")) do_split = 1;
        else if (!strcmp(argv[i], "--sync")) do_sync = 1;
        else if (!strcmp(argv[i], "-m") && i + 1 < argc) model_path = argv[++i];
        else if (!strcmp(argv[i], "-t") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (n_lens < 16) lens[n_lens++] = atoi(argv[i]);
    }
    if (!n_lens) { lens[0] = 512; lens[1] = 2048; n_lens = 2; }
    if (!model_path) model_path = mn_model_default_path();
    mn_errbuf eb;
    mn_backend *be;
    mn_model *m;
    mn_backend_params bp = {.device = "cpu", .n_threads = threads};
    if (mn_backend_cpu_new(&bp, &be, &eb) != MN_OK) die("backend", &eb);
    if (mn_model_load(model_path, be, NULL, &m, &eb) != MN_OK) die(model_path, &eb);
    int32_t max_len = 0;
    for (int i = 0; i < n_lens; i++) max_len = lens[i] > max_len ? lens[i] : max_len;
    if (do_sync) return sync_restores(m, lens, n_lens, max_len);
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
    if (do_split)
        for (int li = 0; li < n_lens; li++) split(e, toks, lens[li], dir, st.bytes_per_token, ep.block_size);
    free(toks);
    mn_engine_free(e);
    rmdir(dir);
    mn_model_free(m);
    mn_backend_free(be);
    return 0;
}
