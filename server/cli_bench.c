/* server/cli_bench.c — `mneme bench`: prompt processing and generation speed, measured
 * the way llama-bench does (a warm-up run, then repetitions; mean and standard deviation
 * of tokens/s), so the numbers compare side by side with llama.cpp on the same file.
 *   ppN  one sequence, N prompt tokens in batches of up to 512, from an empty cache
 *   tgN  N tokens decoded one step at a time from an empty cache; with -b B, B sequences
 *        decode together (one token each per step) and tokens/s is the aggregate.
 * --tp N runs the forward over N ranks (engine/tp.h): CPU ranks with T/N threads each, or
 * with --device cuda GPUs 0..N-1 over NCCL. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/alloc.h"
#include "engine/forward.h"
#include "engine/kv.h"
#include "engine/tp.h"
#include "server/cli.h"

#define MAX_LIST 16
#define KV_BLOCK 16

typedef struct bench_ctx {
    mn_model *m;
    mn_kv_pool *kv;
    mn_forward *f;
    float *logits;
    mn_tp *tp;       /* --tp N > 1: sequence slots of the group instead of kv/f */
} bench_ctx;

/* One batch on the plain forward or on the tensor-parallel group (seqs[s] is slot s). */
static mn_err bench_forward(bench_ctx *b, mn_kv_seq *const *seqs, int32_t n_seqs, const mn_batch *bt, float *logits,
                            mn_errbuf *eb) {
    return b->tp ? mn_tp_run(b->tp, bt, logits, eb) : mn_forward_run(b->f, seqs, n_seqs, bt, logits, eb);
}

static void bench_release(bench_ctx *b, mn_kv_seq *seq, int32_t slot) {
    if (b->tp) mn_tp_seq_release(b->tp, slot);
    else mn_kv_seq_release(b->kv, seq);
}

static int parse_list(const char *flag, const char *s, long lo, long hi, long *out, int *n) {
    char buf[256];
    if (strlen(s) >= sizeof buf) { fprintf(stderr, "mneme: %s: list too long\n", flag); return -1; }
    snprintf(buf, sizeof buf, "%s", s);
    *n = 0;
    char *p = buf;
    for (;;) {
        char *comma = strchr(p, ',');
        if (comma) *comma = 0;
        if (*n == MAX_LIST) { fprintf(stderr, "mneme: %s: at most %d values\n", flag, MAX_LIST); return -1; }
        if (!*p) { fprintf(stderr, "mneme: %s: empty value in list '%s'\n", flag, s); return -1; }
        if (cli_int(flag, p, lo, hi, &out[(*n)++])) return -1;
        if (!comma) break;
        p = comma + 1;
    }
    return 0;
}

/* One timed run; returns seconds or a negative value on error. */
static double run_pp(bench_ctx *b, int32_t n_prompt) {
    mn_errbuf eb = {{0}};
    mn_kv_seq seq = {0};
    mn_kv_seq *seqs[1] = {&seq};
    int32_t chunk = n_prompt < 512 ? n_prompt : 512;
    int32_t *tok = mn_malloc((size_t)chunk * 4), *sq = mn_calloc((size_t)chunk, 4), *pos = mn_malloc((size_t)chunk * 4);
    double t0 = cli_now(), rc = 0;
    for (int32_t done = 0; tok && sq && pos && done < n_prompt && rc == 0;) {
        int32_t c = n_prompt - done < chunk ? n_prompt - done : chunk;
        for (int32_t i = 0; i < c; i++) {
            tok[i] = (int32_t)((done + i) * 7919u % (uint32_t)b->m->cfg.n_vocab);
            pos[i] = done + i;
        }
        int32_t last = c - 1;
        mn_batch bt = {.n_tokens = c, .tokens = tok, .seq = sq, .pos = pos, .n_out = 1, .out_rows = &last};
        if (bench_forward(b, seqs, 1, &bt, b->logits, &eb) != MN_OK) {
            fprintf(stderr, "mneme: %s\n", eb.msg);
            rc = -1;
        }
        done += c;
    }
    double t = cli_now() - t0;
    bench_release(b, &seq, 0);
    mn_free(tok);
    mn_free(sq);
    mn_free(pos);
    return rc < 0 || !tok ? -1 : t;
}

static double run_tg(bench_ctx *b, int32_t n_gen, int32_t n_seq) {
    mn_errbuf eb = {{0}};
    mn_kv_seq *seqv = mn_calloc((size_t)n_seq, sizeof(mn_kv_seq));
    mn_kv_seq **seqs = mn_malloc((size_t)n_seq * sizeof *seqs);
    int32_t *tok = mn_malloc((size_t)n_seq * 4), *sq = mn_malloc((size_t)n_seq * 4), *pos = mn_malloc((size_t)n_seq * 4);
    int32_t *rows = mn_malloc((size_t)n_seq * 4);
    float *logits = mn_malloc((size_t)n_seq * b->m->cfg.n_vocab * sizeof(float));
    double rc = 0, t0 = cli_now();
    if (!seqv || !seqs || !tok || !sq || !pos || !rows || !logits) rc = -1;
    for (int32_t s = 0; rc == 0 && s < n_seq; s++) {
        seqs[s] = &seqv[s];
        sq[s] = s;
        rows[s] = s;
        tok[s] = 1 + s;
    }
    for (int32_t step = 0; rc == 0 && step < n_gen; step++) {
        for (int32_t s = 0; s < n_seq; s++) pos[s] = step;
        mn_batch bt = {.n_tokens = n_seq, .tokens = tok, .seq = sq, .pos = pos, .n_out = n_seq, .out_rows = rows};
        if (bench_forward(b, seqs, n_seq, &bt, logits, &eb) != MN_OK) {
            fprintf(stderr, "mneme: %s\n", eb.msg);
            rc = -1;
        }
        for (int32_t s = 0; s < n_seq; s++) tok[s] = (tok[s] * 31 + step) % b->m->cfg.n_vocab;
    }
    double t = cli_now() - t0;
    for (int32_t s = 0; seqv && s < n_seq; s++) bench_release(b, &seqv[s], s);
    mn_free(seqv); mn_free(seqs); mn_free(tok); mn_free(sq); mn_free(pos); mn_free(rows); mn_free(logits);
    return rc < 0 ? -1 : t;
}

static void bench_usage(void) {
    fprintf(stderr,
            "usage: mneme bench [-m FILE] [-p 512[,N..]] [-n 128[,N..]] [-t T[,T..]] [-b B[,B..]] [-r 3] [--tp N] [--json] [--profile]\n"
            "  -p  prompt lengths (0 to skip)   -n  generation lengths (0 to skip)\n"
            "  -t  thread counts                -b  sequences decoding together (tg tests)\n"
            "  --profile  print where the time goes, per op kind (not with --tp)\n"
            "  --tp N     tensor parallelism over N ranks: CPU ranks with T/N threads each, or GPUs 0..N-1\n"
            "             over NCCL with --device cuda\n");
}

int cmd_bench(int argc, char **argv) {
    cli_model_opts mo = {0};
    long pl[MAX_LIST] = {512}, nl[MAX_LIST] = {128}, tl[MAX_LIST] = {0}, bl[MAX_LIST] = {1}, reps = 3, tp = 1;
    int np = 1, nn = 1, nt = 1, nb = 1;
    bool json = false, profile = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--json")) { json = true; continue; }
        if (!strcmp(a, "--profile")) { profile = true; continue; }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { bench_usage(); return 0; }
        if (!strcmp(a, "-m") || !strcmp(a, "--model") || !strcmp(a, "--device") || !strcmp(a, "-c")) {
            if (cli_model_opt(argc, argv, &i, &mo) < 0) return 2;
            continue;
        }
        if (strcmp(a, "-p") && strcmp(a, "-n") && strcmp(a, "-t") && strcmp(a, "-b") && strcmp(a, "-r") && strcmp(a, "--tp")) {
            fprintf(stderr, "mneme bench: unknown option '%s'\n", a);
            bench_usage();
            return 2;
        }
        if (cli_value(argc, argv, &i, &v)) return 2;
        if (!strcmp(a, "-p")) { if (parse_list(a, v, 0, 1 << 20, pl, &np)) return 2; }
        else if (!strcmp(a, "-n")) { if (parse_list(a, v, 0, 1 << 20, nl, &nn)) return 2; }
        else if (!strcmp(a, "-t")) { if (parse_list(a, v, 1, 1024, tl, &nt)) return 2; }
        else if (!strcmp(a, "-b")) { if (parse_list(a, v, 1, 4096, bl, &nb)) return 2; }
        else if (!strcmp(a, "-r")) { if (cli_int(a, v, 1, 1000, &reps)) return 2; }
        else if (!strcmp(a, "--tp")) { if (cli_int(a, v, 1, 64, &tp)) return 2; }
        else { fprintf(stderr, "mneme bench: unknown option '%s'\n", a); bench_usage(); return 2; }
    }
    int rc = 0;
    if (!json) printf("| %-28s | %9s | %7s | %5s | %8s | %18s |\n", "model", "size", "threads", "batch", "test", "t/s");
    for (int ti = 0; ti < nt && !rc; ti++) {
        mo.threads = (int)tl[ti];
        if (tp > 1 && profile) {
            fprintf(stderr, "mneme: --profile does not work with --tp\n");
            return 1;
        }
        long max_ctx = 0, max_b = 0;
        for (int i = 0; i < np; i++) max_ctx = pl[i] > max_ctx ? pl[i] : max_ctx;
        for (int i = 0; i < nn; i++) max_ctx = nl[i] > max_ctx ? nl[i] : max_ctx;
        for (int i = 0; i < nb; i++) max_b = bl[i] > max_b ? bl[i] : max_b;
        int32_t n_blocks = (int32_t)(max_b * ((max_ctx + KV_BLOCK - 1) / KV_BLOCK + 1));
        mn_backend *be;
        mn_model *m;
        mn_tp *group = NULL;
        if (tp > 1 ? cli_load_tp(&mo, (int)tp, KV_BLOCK, n_blocks, (int32_t)max_b, &group, &be, &m) : cli_load(&mo, &be, &m))
            return 1;
        double op_s[MN_OP_COUNT] = {0};
        int64_t op_n[MN_OP_COUNT] = {0};
        bench_ctx b = {.m = m, .tp = group};
        mn_errbuf eb = {{0}};
        if (group) {
            if (!(b.logits = mn_malloc((size_t)m->cfg.n_vocab * 4))) {
                fprintf(stderr, "mneme: out of memory\n");
                rc = 1;
            }
        } else if (mn_kv_pool_new(be, m->cfg.n_layer, m->cfg.n_kv_head, m->cfg.head_dim, KV_BLOCK, n_blocks, &b.kv, &eb) != MN_OK ||
                   mn_forward_new(m, b.kv, &b.f, &eb) != MN_OK || !(b.logits = mn_malloc((size_t)m->cfg.n_vocab * 4))) {
            fprintf(stderr, "mneme: %s\n", eb.msg);
            rc = 1;
        }
        char threads[32];
        if (b.tp) snprintf(threads, sizeof threads, "%dx%ld", mn_tp_backend(b.tp)->n_threads, tp);
        else snprintf(threads, sizeof threads, "%d", be->n_threads);
        /* tests: every pp length (batch 1), then every tg length for every batch */
        for (int pass = 0; pass < 2 && !rc; pass++) {
            int n_tests = pass == 0 ? np : nn * nb;
            for (int k = 0; k < n_tests && !rc; k++) {
                long len = pass == 0 ? pl[k] : nl[k / nb];
                long batch = pass == 0 ? 1 : bl[k % nb];
                if (len == 0) continue;
                if (pass == 0 ? run_pp(&b, (int32_t)len) < 0 : run_tg(&b, 4, (int32_t)batch) < 0) { rc = 1; break; } /* warm-up */
                if (profile) { be->op_seconds = op_s; be->op_calls = op_n; }
                double sum = 0, sum2 = 0;
                for (long r = 0; r < reps && !rc; r++) {
                    double t = pass == 0 ? run_pp(&b, (int32_t)len) : run_tg(&b, (int32_t)len, (int32_t)batch);
                    if (t < 0) { rc = 1; break; }
                    double tps = (double)len * batch / t;
                    sum += tps;
                    sum2 += tps * tps;
                }
                be->op_seconds = NULL;
                be->op_calls = NULL;
                if (rc) break;
                double mean = sum / reps, sd = reps > 1 ? sqrt(fmax(0, (sum2 - reps * mean * mean) / (reps - 1))) : 0;
                char test[32];
                snprintf(test, sizeof test, "%s%ld", pass == 0 ? "pp" : "tg", len);
                if (json)
                    printf("{\"model\": \"%s\", \"backend\": \"%s\", \"test\": \"%s\", \"n_prompt\": %ld, \"n_gen\": %ld, \"threads\": %d, "
                           "\"batch\": %ld, \"tokens_per_s\": %.3f, \"stddev\": %.3f, \"reps\": %ld, \"tp\": %ld}\n",
                           m->name, mn_backend_name(be), test, pass == 0 ? len : 0, pass == 0 ? 0 : len,
                           b.tp ? mn_tp_backend(b.tp)->n_threads * (int)tp : be->n_threads, batch, mean, sd, reps, tp);
                else
                    printf("| %-28.28s | %5.1f MiB | %7s | %5ld | %8s | %9.2f ± %6.2f |\n", m->name,
                           mn_model_weight_bytes(m) / 1048576.0, threads, batch, test, mean, sd);
                fflush(stdout);
                if (profile) {
                    double tot = 0;
                    for (int o = 0; o < MN_OP_COUNT; o++) tot += op_s[o];
                    fprintf(stderr, "  where the time goes (%s, %d threads):", test, be->n_threads);
                    for (int o = 0; o < MN_OP_COUNT; o++)
                        if (op_n[o]) fprintf(stderr, " %s %.1f%%", mn_op_name((mn_op_kind)o), 100 * op_s[o] / tot);
                    fprintf(stderr, "\n");
                    memset(op_s, 0, sizeof op_s);
                    memset(op_n, 0, sizeof op_n);
                }
            }
        }
        mn_free(b.logits);
        mn_forward_free(b.f);
        mn_kv_pool_free(b.kv);
        cli_release(group, be, m);
    }
    return rc;
}
