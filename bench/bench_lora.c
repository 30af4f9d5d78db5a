/* bench/bench_lora.c — decode throughput with many LoRA adapters in one batch.
 *
 * 32 sequences (a 16-token prompt each, not timed) decode STEPS tokens; each step is one
 * batch of one token per sequence. Sequence i uses adapter i % A for A in 0 (no adapter),
 * 1, 4, 16, 32 distinct adapters (rank 16, all seven targets). Reported per A:
 *   mixed     tokens/s with every adapter in the same batch, and its ratio to A = 0;
 *   separate  tokens/s when each adapter's sequences run as their own batch (what a
 *             server without multi-adapter batching does), and mixed / separate.
 * Throughput is given per wall second and per CPU second of the process (the second is
 * the one to trust on a shared machine: other processes steal wall time, not CPU time;
 * with one thread, the default, no barrier spins inflate it). Best of ROUNDS rounds, the
 * configurations interleaved within each round.
 * Also the adapter load time from disk (safetensors -> host copy, median of 5).
 * Host -> device paging: the registry gets a device budget of one adapter and each of the
 * 32 adapters is acquired in turn (each page-in evicts the previous one): time per
 * page-in and bytes/s from the registry's counters (on the CPU backend the "device" is
 * host memory from the backend, so this is a memcpy; on CUDA a copy over PCIe).
 * Single-adapter fast path: the Q/K/V lora op of layer 0 (one shrink of r_q + r_k + r_v
 * rows, three expands) over 32 and 256 rows that all use one adapter, as one segment (the
 * row-blocked path: four rows per pass over A and B^T) and as the same rows split into
 * segments of 3 rows of the same adapter (the per-row path that segments of under 4 rows
 * take; identical bits), one thread, best of 20.
 * Decode lora ops alone: the 4 LoRA ops of every layer of one decode step, 32 segments of
 * one row each on the 32 adapters, one thread, best of 5: ms a step and GB/s of adapter
 * weights (cold: the 32 adapters do not fit in the caches).
 * The adapter is written once by tools/gen_lora.py (F16, rank 16) into DIR (default
 * /tmp/mneme_bench_lora) and loaded under 32 names: 32 separate copies in memory, so the
 * kernels touch 32 adapters' weights exactly as with 32 different files.
 *   usage: bench_lora [-m MODEL] [-t THREADS (1)] [-s STEPS (8)] [-r ROUNDS (2)] [-d DIR] [-p 1]
 * -p 1 adds a profiled pass per adapter count: the share of decode time in the lora op.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "engine/alloc.h"
#include "engine/forward.h"
#include "engine/kv.h"
#include "engine/lora.h"
#include "engine/model.h"

#define N_SEQ 32
#define PROMPT 16

static double clock_s(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
static double now_s(void) { return clock_s(CLOCK_MONOTONIC); }
static double cpu_s(void) { return clock_s(CLOCK_PROCESS_CPUTIME_ID); }

typedef struct rate { double wall, cpu; } rate;   /* tokens per wall / CPU second */

static void die(const char *what, const mn_errbuf *eb) {
    fprintf(stderr, "bench_lora: %s: %s\n", what, eb->msg);
    exit(1);
}

typedef struct ctx {
    mn_model *m;
    mn_kv_pool *kv;
    mn_forward *f;
    const mn_lora *table[N_SEQ];
    float *logits;
} ctx;

/* Fresh sequences, prompts prefilled (sequence i with adapter ad[i]); then steps decode
 * batches, each split into groups of sequences run as separate batches (group g holds the
 * sequences with i % n_groups == g). Returns decode tokens/s. */
static rate run(ctx *c, const int32_t *ad, int n_groups, int steps) {
    mn_errbuf eb = {{0}};
    mn_kv_seq seqs[N_SEQ] = {{0}};
    mn_kv_seq *sp[N_SEQ];
    int32_t tok[N_SEQ * PROMPT], sq[N_SEQ * PROMPT], pos[N_SEQ * PROMPT], adr[N_SEQ * PROMPT], rows[N_SEQ];
    for (int s = 0; s < N_SEQ; s++) sp[s] = &seqs[s];
    int32_t n = 0;
    for (int s = 0; s < N_SEQ; s++)
        for (int p = 0; p < PROMPT; p++) {
            tok[n] = (s * 7919 + p * 104729) % c->m->cfg.n_vocab, sq[n] = s, pos[n] = p, adr[n] = ad[s];
            if (p == PROMPT - 1) rows[s] = n;
            n++;
        }
    mn_batch_lora lb = {.adapter = adr, .adapters = c->table, .n_adapters = N_SEQ};
    mn_batch b = {.n_tokens = n, .tokens = tok, .seq = sq, .pos = pos, .n_out = N_SEQ, .out_rows = rows};
    if (mn_forward_run_lora(c->f, sp, N_SEQ, &b, &lb, c->logits, &eb) != MN_OK) die("prefill", &eb);
    double t0 = now_s(), c0 = cpu_s();
    for (int step = 0; step < steps; step++) {
        for (int g = 0; g < n_groups; g++) {
            int32_t k = 0;
            for (int s = g; s < N_SEQ; s += n_groups) {
                tok[k] = (s + step * 31) % c->m->cfg.n_vocab, sq[k] = s, pos[k] = PROMPT + step, adr[k] = ad[s], rows[k] = k;
                k++;
            }
            mn_batch d = {.n_tokens = k, .tokens = tok, .seq = sq, .pos = pos, .n_out = k, .out_rows = rows};
            if (mn_forward_run_lora(c->f, sp, N_SEQ, &d, &lb, c->logits, &eb) != MN_OK) die("decode", &eb);
        }
    }
    double dt = now_s() - t0, dc = cpu_s() - c0;
    for (int s = 0; s < N_SEQ; s++) mn_kv_seq_release(c->kv, &seqs[s]);
    return (rate){(double)steps * N_SEQ / dt, (double)steps * N_SEQ / dc};
}

/* Best of 20 single-thread runs of d (y is updated each time; only time matters). */
static double time_op(const mn_lora_desc *d, void *work) {
    mn_par par = {.ith = 0, .nth = 1};
    double best = 1e30;
    for (int i = 0; i < 20; i++) {
        double t0 = now_s();
        mn_cpu_lora(d, work, &par);
        double dt = now_s() - t0;
        if (dt < best) best = dt;
    }
    return best;
}

/* The fast path against the general path on layer 0's Q/K/V group of adapter l. */
static void bench_single(const mn_lora *l) {
    const mn_lora_layer *ly = &l->layers[0];
    const int64_t K = l->n_embd, N[3] = {l->n_q, l->n_kv, l->n_kv};
    const int rows_n[2] = {32, 256};
    for (int c = 0; c < 2; c++) {
        const int T = rows_n[c];
        float *x = mn_malloc((size_t)T * K * sizeof(float));
        float *y[3];
        int32_t *rows = mn_malloc((size_t)T * sizeof(int32_t));
        for (int64_t i = 0; i < T * K; i++) x[i] = (float)((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
        for (int o = 0; o < 3; o++) y[o] = mn_calloc((size_t)T * N[o], sizeof(float));
        for (int i = 0; i < T; i++) rows[i] = i;
        mn_lora_seg one = {.start = 0, .n_rows = T, .type = l->wtype, .a = ly->t[MN_LORA_Q].a};
        for (int o = 0; o < 3; o++) {
            const mn_lora_mat *mt = &ly->t[MN_LORA_Q + o];
            one.b[o] = mt->b, one.r_off[o] = one.r, one.r_out[o] = mt->r, one.scale[o] = mt->scale;
            one.r += mt->r;
        }
        const int n3 = (T + 2) / 3;
        mn_lora_seg *three = mn_malloc((size_t)n3 * sizeof *three);
        for (int k = 0; k < n3; k++) {
            three[k] = one;
            three[k].start = 3 * k;
            three[k].n_rows = T - 3 * k < 3 ? T - 3 * k : 3;
        }
        mn_lora_desc d = {.K = K, .x = x, .x_stride = K, .n_out = 3, .n_seg = 1, .seg = &one, .rows = rows};
        for (int o = 0; o < 3; o++) d.N[o] = N[o], d.y[o] = y[o], d.y_stride[o] = N[o];
        mn_lora_desc d2 = d;
        d2.n_seg = n3, d2.seg = three;
        void *work = mn_malloc(mn_cpu_lora_work_bytes(&d) + 64);
        double fast = time_op(&d, work), general = time_op(&d2, work);
        printf("single-adapter fast path, qkv op, %3d rows, rank %d x3, K %lld: %.1f us (per-row path %.1f us): "
               "%.2fx\n", T, ly->t[MN_LORA_Q].r, (long long)K, fast * 1e6, general * 1e6, general / fast);
        mn_free(work);
        mn_free(three);
        mn_free(x);
        mn_free(rows);
        for (int o = 0; o < 3; o++) mn_free(y[o]);
    }
}

/* The LoRA ops of one decode step alone: every layer's Q/K/V, O, gate/up and down ops over
 * N_SEQ rows, row i on adapter i (one segment of one row each: the per-row path), one
 * thread, best of 5 steps. Each step reads every adapter's A and B once (N_SEQ x the
 * adapter's bytes, more than the caches hold), so this is the op's streaming rate. */
static void bench_decode_ops(const mn_lora *const *tab) {
    static const struct { int t0, n_out; } grp[4] = {{MN_LORA_Q, 3}, {MN_LORA_O, 1}, {MN_LORA_GATE, 2}, {MN_LORA_DOWN, 1}};
    const mn_lora *l0 = tab[0];
    const int64_t nl = l0->n_layer, width = l0->n_ff > l0->n_embd ? l0->n_ff : l0->n_embd;
    float *x = mn_malloc((size_t)N_SEQ * width * sizeof(float)), *y[3];
    for (int64_t i = 0; i < N_SEQ * width; i++) x[i] = (float)((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
    for (int o = 0; o < 3; o++) y[o] = mn_calloc((size_t)N_SEQ * width, sizeof(float));
    int32_t rows[N_SEQ];
    for (int i = 0; i < N_SEQ; i++) rows[i] = i;
    mn_lora_seg *segs = mn_malloc((size_t)nl * 4 * N_SEQ * sizeof *segs);
    mn_lora_desc *ds = mn_calloc((size_t)nl * 4, sizeof *ds);
    size_t work_bytes = 0;
    double bytes = 0;
    const int64_t esz = l0->wtype == MN_F32 ? 4 : 2;
    for (int64_t L = 0; L < nl; L++)
        for (int g = 0; g < 4; g++) {
            mn_lora_desc *d = &ds[L * 4 + g];
            mn_lora_seg *sg = &segs[(L * 4 + g) * N_SEQ];
            const int t0 = grp[g].t0;
            const int64_t K = t0 == MN_LORA_DOWN ? l0->n_ff : t0 == MN_LORA_O ? l0->n_q : l0->n_embd;
            int64_t N[3];
            for (int o = 0; o < grp[g].n_out; o++) {
                const int t = t0 + o;
                N[o] = t == MN_LORA_Q ? l0->n_q : t <= MN_LORA_V ? l0->n_kv : t == MN_LORA_O || t == MN_LORA_DOWN ? l0->n_embd : l0->n_ff;
            }
            for (int s = 0; s < N_SEQ; s++) {
                const mn_lora_layer *ly = &tab[s]->layers[L];
                sg[s] = (mn_lora_seg){.start = s, .n_rows = 1, .type = tab[s]->wtype, .a = ly->t[t0].a};
                for (int o = 0; o < grp[g].n_out; o++) {
                    const mn_lora_mat *mt = &ly->t[t0 + o];
                    sg[s].b[o] = mt->b, sg[s].r_off[o] = sg[s].r, sg[s].r_out[o] = mt->r, sg[s].scale[o] = mt->scale;
                    sg[s].r += mt->r;
                    bytes += (double)mt->r * (K + N[o]) * esz;
                }
            }
            *d = (mn_lora_desc){.K = K, .x = x, .x_stride = K, .n_out = grp[g].n_out, .n_seg = N_SEQ, .seg = sg, .rows = rows};
            for (int o = 0; o < grp[g].n_out; o++) d->N[o] = N[o], d->y[o] = y[o], d->y_stride[o] = N[o];
            if (mn_cpu_lora_work_bytes(d) > work_bytes) work_bytes = mn_cpu_lora_work_bytes(d);
        }
    void *work = mn_malloc(work_bytes + 64);
    mn_par par = {.ith = 0, .nth = 1};
    double best = 1e30;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now_s();
        for (int64_t i = 0; i < nl * 4; i++) mn_cpu_lora(&ds[i], work, &par);
        double dt = now_s() - t0;
        if (dt < best) best = dt;
    }
    printf("decode lora ops alone, %d adapters x 1 row, %lld layers x 4 ops, 1 thread (%s): %.2f ms a step, %.0f MB, "
           "%.1f GB/s\n", N_SEQ, (long long)nl, mn_cpu_simd_name(), best * 1e3, bytes / 1e6, bytes / best / 1e9);
    mn_free(work);
    mn_free(ds);
    mn_free(segs);
    mn_free(x);
    for (int o = 0; o < 3; o++) mn_free(y[o]);
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *dir = "/tmp/mneme_bench_lora";
    int threads = 1, steps = 8, rounds = 2, profile = 0;
    for (int i = 1; i + 1 < argc; i++) {
        if (!strcmp(argv[i], "-m")) model_path = argv[++i];
        else if (!strcmp(argv[i], "-t")) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-s")) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-d")) dir = argv[++i];
        else if (!strcmp(argv[i], "-r")) rounds = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-p")) profile = atoi(argv[++i]);
    }
    static char cmd[8192], cfgp[4200];
    if (!model_path) model_path = mn_model_default_path();
    snprintf(cfgp, sizeof cfgp, "%s/adapter_config.json", dir);
    struct stat sb;
    if (stat(cfgp, &sb) != 0) {
        snprintf(cmd, sizeof cmd, "python3 tools/gen_lora.py '%s' --model '%s' --r 16 --dtype F16 --seed 1", dir, model_path);
        fprintf(stderr, "bench_lora: writing the adapter: %s\n", cmd);
        if (system(cmd) != 0) {
            fprintf(stderr, "bench_lora: could not write the adapter (run from the repository root)\n");
            return 1;
        }
    }
    mn_errbuf eb = {{0}};
    mn_backend *be;
    mn_backend_params bp = {.device = "cpu", .n_threads = threads};
    ctx c = {0};
    if (mn_backend_cpu_new(&bp, &be, &eb) != MN_OK) die("backend", &eb);
    if (mn_model_load(model_path, be, NULL, &c.m, &eb) != MN_OK) die(model_path, &eb);
    const mn_model_config *mc = &c.m->cfg;
    int32_t bs = 16, blocks = N_SEQ * ((PROMPT + steps + bs - 1) / bs + 1);
    if (mn_kv_pool_new(be, mc->n_layer, mc->n_kv_head, mc->head_dim, bs, blocks, &c.kv, &eb) != MN_OK) die("kv", &eb);
    if (mn_forward_new(c.m, c.kv, &c.f, &eb) != MN_OK) die("forward", &eb);
    c.logits = mn_malloc((size_t)N_SEQ * mc->n_vocab * sizeof(float));

    mn_lora_registry *reg;
    if (mn_lora_registry_new(c.m, &reg, &eb) != MN_OK) die("registry", &eb);
    double load[5], load_cpu[5];
    for (int i = 0; i < N_SEQ; i++) {
        char name[16];
        snprintf(name, sizeof name, "ad%d", i);
        double t0 = now_s(), c0 = cpu_s();
        if (mn_lora_registry_load(reg, name, dir, NULL, &eb) != MN_OK) die(dir, &eb);
        if (i < 5) load[i] = now_s() - t0, load_cpu[i] = cpu_s() - c0;
    }
    qsort(load, 5, sizeof load[0], cmp_d);
    qsort(load_cpu, 5, sizeof load_cpu[0], cmp_d);
    int32_t n_tab;
    const mn_lora *const *tab = mn_lora_registry_table(reg, &n_tab);
    for (int i = 0; i < N_SEQ; i++) c.table[i] = tab[i];
    printf("model %s, %d threads, %d sequences x %d decode steps, rank %d adapters (%.1f MB of %s each)\n", c.m->name,
           be->n_threads, N_SEQ, steps, tab[0]->r_max, tab[0]->bytes / 1e6, mn_dtype_name(tab[0]->wtype));
    printf("adapter load from disk (F16 safetensors -> host copy): median %.1f ms wall, %.1f ms CPU (min %.1f / %.1f)\n",
           load[2] * 1e3, load_cpu[2] * 1e3, load[0] * 1e3, load_cpu[0] * 1e3);

    /* paging host -> device: a budget of one adapter, every adapter acquired in turn */
    if (mn_lora_registry_set_budget(reg, be, (size_t)tab[0]->bytes, &eb) != MN_OK) die("budget", &eb);
    for (int32_t i = 0; i < N_SEQ; i++) {
        const mn_lora *const *t2;
        int32_t n2;
        if (mn_lora_registry_acquire_batch(reg, &i, 1, &t2, &n2, &eb) != MN_OK) die("page-in", &eb);
        mn_lora_registry_release_batch(reg, &i, 1);
    }
    mn_lora_stats st;
    mn_lora_registry_stats(reg, &st);
    printf("paging host -> device (%s backend, budget one adapter): %llu page-ins, %llu evictions, %.3f ms per "
           "adapter, %.2f GB/s\n", mn_backend_name(be), (unsigned long long)st.page_ins,
           (unsigned long long)st.evictions, st.page_in_seconds / (double)st.page_ins * 1e3, (double)st.bytes_in / st.page_in_seconds / 1e9);
    if (mn_lora_registry_set_budget(reg, NULL, 0, &eb) != MN_OK) die("budget", &eb);
    bench_single(tab[0]);
    bench_decode_ops(tab);

    /* configs: 0 = no adapter; then A = 1, 4, 16, 32 mixed, and A = 4, 16, 32 separate */
    const int counts[5] = {0, 1, 4, 16, 32};
    rate best[5][2];
    memset(best, 0, sizeof best);
    int32_t ad[N_SEQ];
    for (int s = 0; s < N_SEQ; s++) ad[s] = -1;
    run(&c, ad, 1, 2); /* warm-up */
    for (int round = 0; round < rounds; round++) {
        for (int k = 0; k < 5; k++) {
            int A = counts[k];
            for (int s = 0; s < N_SEQ; s++) ad[s] = A ? s % A : -1;
            for (int sep = 0; sep < (A > 1 ? 2 : 1); sep++) {
                rate r = run(&c, ad, sep ? A : 1, steps);
                if (r.wall > best[k][sep].wall) best[k][sep].wall = r.wall;
                if (r.cpu > best[k][sep].cpu) best[k][sep].cpu = r.cpu;
            }
        }
    }
    for (int k = 1; profile && k < 5; k++) {
        double op_s[MN_OP_COUNT] = {0};
        int64_t op_n[MN_OP_COUNT] = {0};
        for (int s = 0; s < N_SEQ; s++) ad[s] = s % counts[k];
        be->op_seconds = op_s;
        be->op_calls = op_n;
        run(&c, ad, 1, steps);
        be->op_seconds = NULL;
        be->op_calls = NULL;
        double tot = 0;
        for (int o = 0; o < MN_OP_COUNT; o++) tot += op_s[o];
        printf("profile, %2d adapters (prefill + decode): lora op %.1f%% of op time, matmul %.1f%%\n", counts[k],
               100 * op_s[MN_OP_LORA] / tot, 100 * op_s[MN_OP_MATMUL] / tot);
    }
    printf("tokens/s per wall second | per CPU second; ratios from the CPU-second numbers\n");
    printf("%-9s %17s %8s %19s %10s\n", "adapters", "mixed wall|cpu", "vs none", "separate wall|cpu", "mixed/sep");
    for (int k = 0; k < 5; k++) {
        int A = counts[k];
        rate m = best[k][0], sp = A > 1 ? best[k][1] : m;
        printf("%-9d %8.1f|%-8.1f %8.3f %9.1f|%-9.1f %10.2f\n", A, m.wall, m.cpu, m.cpu / best[0][0].cpu, sp.wall, sp.cpu,
               m.cpu / sp.cpu);
    }
    mn_lora_registry_free(reg);
    mn_free(c.logits);
    mn_forward_free(c.f);
    mn_kv_pool_free(c.kv);
    mn_model_free(c.m);
    mn_backend_free(be);
    return 0;
}
