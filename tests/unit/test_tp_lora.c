/* tests/unit/test_tp_lora.c — LoRA adapters with tensor parallelism, against TP = 1.
 *
 * Ranks are threads (tests/unit/tp_group.h), each loading the adapters against its own
 * model. One workload: several sequences, each with its own adapter or none, prefilled
 * in one batch with their rows interleaved, then greedy decode steps with one row per
 * sequence in each batch. Adapters come from tools/gen_lora.py with different ranks,
 * targets and storage types (F32, F16, BF16), so a batch has segments of mixed rank and
 * rows without an adapter, and every linear group is adapted by some adapter: column-
 * parallel q/k/v and gate/up (each rank expands into its own output features) and
 * row-parallel o and down (partial shrink per rank, v summed over ranks).
 *
 * Checked, for TP 2 and 4 on a synthetic F32 model and TP 3 on SmolLM2 (9/3 heads: TP 2
 * does not divide them):
 *   - logits within the bound of test_tp.c (row-max relative error and mean KL against
 *     TP = 1) and the same greedy tokens;
 *   - the adapters matter: without them the logits of adapted sequences move by far more
 *     than the bound (so a TP bug in the adapter path cannot hide under it);
 *   - bit-identical between ranks (group_run_lora), between two fresh TP groups, and, for
 *     the sequence without an adapter, with the same TP group run without adapters;
 *   - engine/tp.h's mn_tp_run_lora (adapters shared by the ranks) gives the thread
 *     group's bits, and refuses a bad adapter index on every rank alike.
 * Bounds (x86-64 AVX2, 2026-11): see the measured values in each test's comment.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/alloc.h"
#include "engine/tokenizer.h"
#include "engine/tp.h"
#include "tests/unit/tp_group.h"

enum { STEPS = 12, MAX_LEN = 64, MAX_ROWS = MAX_SEQS * MAX_LEN };

typedef struct workload {
    int ns;                            /* sequences, <= MAX_SEQS */
    const int32_t *prompt[MAX_SEQS];
    int len[MAX_SEQS];                 /* each <= MAX_LEN */
    int32_t adapter[MAX_SEQS];         /* per sequence, -1: none */
} workload;

static int workload_rows(const workload *w) {
    int n = w->ns * STEPS;
    for (int s = 0; s < w->ns; s++) n += w->len[s];
    return n;
}

/* The prefill batch of w: row i of each prompt, then row i + 1, ...; every row's logits
 * wanted; last[s]: the row of sequence s's last prompt token. Returns the row count. */
static int prefill_rows(const workload *w, int32_t *tok, int32_t *sq, int32_t *pos, int32_t *rows, int32_t *ad, int *last) {
    int n = 0;
    for (int i = 0; i < MAX_LEN; i++)
        for (int s = 0; s < w->ns; s++)
            if (i < w->len[s]) {
                tok[n] = w->prompt[s][i];
                sq[n] = s;
                pos[n] = i;
                ad[n] = w->adapter[s];
                rows[n] = n;
                last[s] = n++;
            }
    return n;
}

/* Prefill every prompt in one batch (row i of each prompt, then row i + 1, ...), then STEPS
 * steps of one row per sequence. with_adapters false: the same batches without adapters.
 * logits: [workload_rows][V] of rank 0, prefill rows in batch order then the steps;
 * toks[s][k]: greedy token k of sequence s. The sequences are emptied afterwards. */
static void run_workload(group *g, const workload *w, bool with_adapters, float *logits, int32_t toks[][STEPS]) {
    const int32_t V = g->V;
    int32_t tok[MAX_ROWS], sq[MAX_ROWS], pos[MAX_ROWS], rows[MAX_ROWS], ad[MAX_ROWS];
    int last[MAX_SEQS];
    int n = prefill_rows(w, tok, sq, pos, rows, ad, last);
    g->n_seqs = w->ns;
    mn_batch b = {n, tok, sq, pos, n, rows};
    group_run_lora(g, &b, with_adapters ? ad : NULL);
    memcpy(logits, g->r[0].logits, (size_t)n * V * sizeof(float));
    int32_t next[MAX_SEQS];
    for (int s = 0; s < w->ns; s++) next[s] = argmax(logits + (size_t)last[s] * V, V);
    for (int k = 0; k < STEPS; k++) {
        for (int s = 0; s < w->ns; s++) {
            toks[s][k] = next[s];
            sq[s] = s;
            pos[s] = w->len[s] + k;
            ad[s] = w->adapter[s];
            rows[s] = s;
        }
        mn_batch d = {w->ns, next, sq, pos, w->ns, rows};
        group_run_lora(g, &d, with_adapters ? ad : NULL);
        memcpy(logits + (size_t)n * V, g->r[0].logits, (size_t)w->ns * V * sizeof(float));
        for (int s = 0; s < w->ns; s++) next[s] = argmax(logits + (size_t)(n + s) * V, V);
        n += w->ns;
    }
    for (int i = 0; i < (g->P ? g->P : 1); i++)
        for (int s = 0; s < MAX_SEQS; s++) mn_kv_seq_release(g->r[i].kv, &g->r[i].seq[s]);
}

/* Rows of sequence s in run_workload's logits, in order: their indices into out. */
static int seq_rows(const workload *w, int s, int *out) {
    int n = 0, k = 0;
    for (int i = 0; i < MAX_LEN; i++)
        for (int q = 0; q < w->ns; q++)
            if (i < w->len[q]) {
                if (q == s) out[k++] = n;
                n++;
            }
    for (int j = 0; j < STEPS; j++) out[k++] = n + j * w->ns + s;
    return k;
}

/* Adapters written by tools/gen_lora.py into a temporary directory (removed by adapters_rm). */
typedef struct adapters {
    char root[64];
    char dir[MAX_ADAPTERS][96];
    int n;
} adapters;

static void adapters_gen(adapters *a, const char *model, const char *const *args, int n) {
    snprintf(a->root, sizeof a->root, "/tmp/mn_tp_lora_XXXXXX");
    assert_non_null(mkdtemp(a->root));
    const char *src = getenv("MNEME_SOURCE_DIR") ? getenv("MNEME_SOURCE_DIR") : ".";
    a->n = n;
    for (int i = 0; i < n; i++) {
        snprintf(a->dir[i], sizeof a->dir[i], "%s/a%d", a->root, i);
        char cmd[2048];
        snprintf(cmd, sizeof cmd, "python3 %s/tools/gen_lora.py %s --model %s %s >/dev/null", src, a->dir[i], model, args[i]);
        if (system(cmd) != 0) fail_msg("cannot write an adapter (python3 with numpy and gguf is needed): %s", cmd);
    }
}

static void adapters_rm(const adapters *a) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", a->root);
    assert_int_equal(system(cmd), 0);
}

static void open_with(group *g, const char *path, int P, const adapters *a) {
    mn_errbuf eb;
    if (group_open(g, path, P, &eb) != MN_OK) fail_msg("TP %d: %s", P, eb.msg);
    for (int i = 0; i < a->n; i++) group_load_adapter(g, a->dir[i]);
}

/* The checks of the file header for one model, workload and TP size. ref / ref_base:
 * TP = 1 with and without adapters (logits and tokens). */
static void check_tp_lora(const char *path, const adapters *a, const workload *w, int P, const float *ref,
                          int32_t ref_toks[][STEPS], const float *ref_base, double bound, double kl_bound,
                          double min_effect, const char *what) {
    const int rows = workload_rows(w);
    group g;
    open_with(&g, path, P, a);
    const int32_t V = g.V;
    const size_t bytes = (size_t)rows * V * sizeof(float);
    float *lt = malloc(bytes), *lt2 = malloc(bytes), *lb = malloc(bytes);
    int32_t tt[MAX_SEQS][STEPS], tt2[MAX_SEQS][STEPS], tb[MAX_SEQS][STEPS];
    run_workload(&g, w, true, lt, tt);
    run_workload(&g, w, false, lb, tb);
    group_close(&g);

    double err = max_rel_err(lt, ref, rows, V), kl = mean_kl(lt, ref, rows, V);
    printf("  %s: TP %d vs TP 1 with adapters: max relative logit error %.3g (bound %.3g), mean KL %.3g (bound %.3g)\n",
           what, P, err, bound, kl, kl_bound);
    int bad_s = -1, bad_k = 0;
    for (int s = 0; s < w->ns; s++) {
        /* how confident TP 1's greedy picks are: the smallest top-2 logit gap */
        int idx[MAX_LEN + STEPS];
        const int nk = seq_rows(w, s, idx);
        double gap = INFINITY;
        for (int k = nk - STEPS - 1; k < nk - 1; k++) {
            const float *rr = ref + (size_t)idx[k] * V;
            const int32_t b1 = argmax(rr, V);
            float second = -INFINITY;
            for (int32_t v = 0; v < V; v++)
                if (v != b1 && rr[v] > second) second = rr[v];
            if (rr[b1] - second < gap) gap = rr[b1] - second;
        }
        printf("    seq %d (adapter %2d): smallest top-2 logit gap of TP 1 %.3g, greedy", s, w->adapter[s], gap);
        for (int k = 0; k < STEPS; k++) printf(" %d", tt[s][k]);
        printf("\n");
        for (int k = 0; k < STEPS && bad_s < 0; k++)
            if (tt[s][k] != ref_toks[s][k]) bad_s = s, bad_k = k;
    }
    if (bad_s >= 0)
        fail_msg("%s TP %d: sequence %d (adapter %d): greedy token %d is %d, TP 1 gives %d", what, P, bad_s,
                 w->adapter[bad_s], bad_k, tt[bad_s][bad_k], ref_toks[bad_s][bad_k]);
    if (!(err <= bound)) fail_msg("%s TP %d: max relative logit error %g over the bound %g", what, P, err, bound);
    if (!(kl <= kl_bound)) fail_msg("%s TP %d: mean KL divergence %g over the bound %g", what, P, kl, kl_bound);

    /* each adapted sequence: its adapter moves its logits by more than min_effect (TP 1);
     * the sequence without one: the bits of the TP run without adapters */
    int idx[MAX_LEN + STEPS];
    for (int s = 0; s < w->ns; s++) {
        int k = seq_rows(w, s, idx);
        float *x = malloc((size_t)k * V * sizeof(float)), *y = malloc((size_t)k * V * sizeof(float));
        float *z = malloc((size_t)k * V * sizeof(float)), *u = malloc((size_t)k * V * sizeof(float));
        for (int i = 0; i < k; i++) {
            memcpy(x + (size_t)i * V, ref + (size_t)idx[i] * V, (size_t)V * sizeof(float));
            memcpy(y + (size_t)i * V, ref_base + (size_t)idx[i] * V, (size_t)V * sizeof(float));
            memcpy(z + (size_t)i * V, lt + (size_t)idx[i] * V, (size_t)V * sizeof(float));
            memcpy(u + (size_t)i * V, lb + (size_t)idx[i] * V, (size_t)V * sizeof(float));
        }
        if (w->adapter[s] >= 0) {
            double eff = max_rel_err(x, y, k, V);
            printf("    seq %d: adapter %d moves the TP 1 logits by %.3g (must exceed %.3g)\n", s, w->adapter[s], eff,
                   min_effect);
            if (!(eff > min_effect)) fail_msg("%s: adapter %d changes the logits by only %g", what, w->adapter[s], eff);
        } else if (memcmp(z, u, (size_t)k * V * sizeof(float)) != 0) {
            fail_msg("%s TP %d: sequence %d (no adapter) differs from the same group run without adapters", what, P, s);
        }
        free(x);
        free(y);
        free(z);
        free(u);
    }

    /* determinism: a fresh group, the same bits */
    open_with(&g, path, P, a);
    run_workload(&g, w, true, lt2, tt2);
    group_close(&g);
    if (memcmp(lt, lt2, bytes) != 0) fail_msg("%s TP %d: two runs give different logits", what, P);
    free(lt);
    free(lt2);
    free(lb);
}

/* engine/tp.h (what `mneme generate --tp` runs) with adapters: one host copy of each,
 * loaded against rank 0's model and shared by the ranks, 2 threads per rank; the prefill
 * gives the bits of the thread group above (1 thread per rank: ops are thread-count
 * invariant). An adapter index past the table is refused by every rank alike (nothing
 * stored, the group stays usable). */
static void check_tp_api(const char *path, const adapters *a, const workload *w) {
    mn_errbuf eb;
    mn_tp *t;
    mn_tp_params p = {.n_ranks = 2, .n_threads = 2, .block_size = 16, .n_blocks = 64, .n_seqs = w->ns};
    if (mn_tp_new(path, &p, &t, &eb) != MN_OK) fail_msg("%s", eb.msg);
    mn_lora *ad[MAX_ADAPTERS] = {0};
    for (int i = 0; i < a->n; i++)
        if (mn_lora_load(a->dir[i], a->dir[i], mn_tp_model(t), &ad[i], &eb) != MN_OK) fail_msg("%s", eb.msg);
    int32_t tok[MAX_ROWS], sq[MAX_ROWS], pos[MAX_ROWS], rows[MAX_ROWS], adv[MAX_ROWS];
    int last[MAX_SEQS];
    const int n = prefill_rows(w, tok, sq, pos, rows, adv, last);
    mn_batch b = {n, tok, sq, pos, n, rows};
    group g;
    open_with(&g, path, 2, a);
    g.n_seqs = w->ns;
    group_run_lora(&g, &b, adv);
    float *got = malloc((size_t)n * g.V * sizeof(float));
    const int32_t keep = adv[0];
    adv[0] = a->n;
    mn_batch_lora lb = {adv, (const mn_lora *const *)ad, a->n};
    assert_int_equal(mn_tp_run_lora(t, &b, &lb, got, &eb), MN_ERANGE);
    printf("  mn_tp_run_lora with adapter index %d of %d: %s\n", a->n, a->n, eb.msg);
    assert_int_equal(mn_tp_seq_len(t, 0), 0);
    adv[0] = keep;
    if (mn_tp_run_lora(t, &b, &lb, got, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (memcmp(got, g.r[0].logits, (size_t)n * g.V * sizeof(float)) != 0)
        fail_msg("mn_tp_run_lora differs from the thread group with the same adapters");
    printf("  mn_tp_run_lora (2 ranks x 2 threads, shared adapters): the thread group's bits\n");
    free(got);
    group_close(&g);
    for (int i = 0; i < a->n; i++) mn_lora_free(ad[i]);
    mn_tp_free(t);
}

/* TP = 1 logits and tokens of w, with and without adapters. */
static void reference(const char *path, const adapters *a, const workload *w, float **ref, int32_t toks[][STEPS],
                      float **base) {
    group g;
    open_with(&g, path, 0, a);
    const size_t bytes = (size_t)workload_rows(w) * g.V * sizeof(float);
    int32_t tb[MAX_SEQS][STEPS];
    *ref = malloc(bytes);
    *base = malloc(bytes);
    run_workload(&g, w, true, *ref, toks);
    run_workload(&g, w, false, *base, tb);
    group_close(&g);
}

/* Synthetic F32 model (as test_tp.c's: GQA 8/4 heads, n_ff 96) and three adapters:
 *   0: rank 4 on all seven linears, F32;
 *   1: rank 8 on q, v, o, up, down (o rank 3), F16;
 *   2: rank 2 on k, gate, down, BF16, rslora;
 * (alphas raised so each moves the logits by far more than the bound), four sequences:
 * adapters 0, 1, none, 2. TP 2 and TP 4 (2 query and 1 kv head, 24 ffn features per rank).
 * Bound: test_tp.c's F32 bound 1e-5 (only f32 summation order differs: o and down, and
 * now the lora shrink of o and down). Measured: TP 2 / TP 4 error 7.8e-7 / 4.0e-7; the
 * adapters move the logits by 0.16, 0.21 and 0.013 of the row max (threshold 5e-3).
 * Planted bugs, TP 2 (each fails): v left out of the all-reduce: rank logits differ;
 * every rank expanding q/k/v/gate/up with rank 0's rows of B: error 0.12; the o/down
 * shrink reading columns from 0 instead of the rank's: 0.14; the o/down expand dropped:
 * 0.22. */
static void test_synthetic_mixed(void **state) {
    (void)state;
    char path[256];
    gen_model(path, sizeof path, "lora",
              "--type F32 --n-layer 2 --n-embd 64 --n-head 8 --n-kv-head 4 --head-dim 8 --n-ff 96 --n-vocab 300 "
              "--seed 7");
    static const char *const args[3] = {
        "--r 4 --alpha 40 --seed 11",
        "--r 8 --targets q_proj,v_proj,o_proj,up_proj,down_proj --rank-pattern '{\"o_proj\": 3}' --alpha 64 --dtype F16 --seed 12",
        "--r 2 --alpha 16 --targets k_proj,gate_proj,down_proj --dtype BF16 --rslora --seed 13"};
    adapters a;
    adapters_gen(&a, path, args, 3);
    static const int32_t p0[7] = {1, 5, 9, 200, 7, 7, 42}, p1[5] = {299, 0, 3, 150, 150};
    static const int32_t p2[9] = {11, 12, 13, 14, 15, 16, 17, 18, 19}, p3[6] = {250, 40, 2, 99, 98, 97};
    workload w = {4, {p0, p1, p2, p3}, {7, 5, 9, 6}, {0, 1, -1, 2}};
    float *ref, *base;
    int32_t rt[MAX_SEQS][STEPS];
    reference(path, &a, &w, &ref, rt, &base);
    check_tp_lora(path, &a, &w, 2, ref, rt, base, 1e-5, 1e-6, 5e-3, "synthetic F32");
    check_tp_lora(path, &a, &w, 4, ref, rt, base, 1e-5, 1e-6, 5e-3, "synthetic F32");
    check_tp_api(path, &a, &w);
    free(ref);
    free(base);
    adapters_rm(&a);
    unlink(path);
}

static int tokenize_chat(const mn_model *m, const char *user, int32_t *out) {
    char text[512];
    snprintf(text, sizeof text, "<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n", user);
    int32_t *tok;
    int64_t n;
    mn_errbuf eb;
    assert_int_equal(mn_tokenize(m->tok, text, strlen(text), MN_TOK_PARSE_SPECIAL, &tok, &n, &eb), MN_OK);
    assert_true(n > 0 && n <= MAX_LEN);
    memcpy(out, tok, (size_t)n * sizeof *tok);
    mn_free(tok);
    return (int)n;
}

/* SmolLM2 Q4_1 in 3 ranks (3 query heads, 1 kv head, 512 ffn features each) with two
 * adapters from gen_lora.py (rank 8 on all linears, F32, scale 2; rank 4 on q, v, o, down,
 * BF16, scale 3) and three chat prompts: adapter 0, adapter 1, none. Bounds those of
 * test_tp.c's SmolLM2 check (0.15, KL 1e-2: quantized activations flip roundings over 30
 * layers, so logits move by up to ~1 between two valid runs and a greedy pick closer than
 * that to the runner-up can flip): the prompts were picked for smallest top-2 gaps of
 * 0.9 .. 1.6 over the steps (printed). Measured: error 5.4e-2, KL 2.0e-3, greedy tokens
 * equal; the adapters move the logits by 0.36 and 0.21 (threshold 0.15, the bound).
 * Planted bugs (each fails): v left out of the all-reduce: rank logits differ; rank 0's
 * rows of B on every rank: error 0.22; o/down shrink from column 0: a greedy token
 * differs; o/down expand dropped: error 0.25. */
static void test_smollm2_tp3(void **state) {
    (void)state;
    const char *path = smollm2_path();
    static const char *const args[2] = {"--r 8 --alpha 16 --seed 21",
                                        "--r 4 --alpha 12 --targets q_proj,v_proj,o_proj,down_proj --dtype BF16 --seed 22"};
    adapters a;
    adapters_gen(&a, path, args, 2);
    mn_backend *be;
    mn_model *m;
    mn_errbuf eb;
    mn_backend_params bp = {.device = "cpu", .n_threads = 1};
    assert_int_equal(mn_backend_cpu_new(&bp, &be, &eb), MN_OK);
    if (mn_model_load(path, be, NULL, &m, &eb) != MN_OK) fail_msg("%s (run tools/setup.sh)", eb.msg);
    int32_t p[3][MAX_LEN];
    workload w = {3, {p[0], p[1], p[2]}, {0}, {0, 1, -1}};
    const char *q[3] = {"Who wrote Romeo and Juliet?", "What is the capital of Germany?", "What is the capital of France?"};
    w.len[0] = tokenize_chat(m, q[0], p[0]);
    w.len[1] = tokenize_chat(m, q[1], p[1]);
    w.len[2] = tokenize_chat(m, q[2], p[2]);
    mn_model_free(m);
    mn_backend_free(be);
    float *ref, *base;
    int32_t rt[MAX_SEQS][STEPS];
    reference(path, &a, &w, &ref, rt, &base);
    check_tp_lora(path, &a, &w, 3, ref, rt, base, 0.15, 1e-2, 0.15, "SmolLM2 Q4_1");
    free(ref);
    free(base);
    adapters_rm(&a);
}

/* The N-th allocation fails during a TP group's first batch with adapters, for every N
 * (the lora plan, its device copy, the room for the all-reduced v): an error every time,
 * never a hang, nothing leaked, and a run that succeeds gives the bits of one without
 * failures. */
static void test_alloc_failures_lora(void **state) {
    (void)state;
    char path[256];
    gen_model(path, sizeof path, "loraoom",
              "--type Q8_0 --n-layer 1 --n-embd 64 --n-head 4 --n-kv-head 2 --head-dim 16 --n-ff 64 --n-vocab 260");
    static const char *const args[2] = {"--r 3 --seed 41", "--r 5 --targets o_proj,down_proj --dtype F16 --seed 42"};
    adapters a;
    adapters_gen(&a, path, args, 2);
    const mn_tp_params p = {.n_ranks = 2, .n_threads = 1, .block_size = 16, .n_blocks = 8, .n_seqs = 1};
    mn_errbuf eb;
    mn_tp *t;
    assert_int_equal(mn_tp_new(path, &p, &t, &eb), MN_OK);
    mn_lora *ad[2];
    for (int i = 0; i < 2; i++) assert_int_equal(mn_lora_load(a.dir[i], a.dir[i], mn_tp_model(t), &ad[i], &eb), MN_OK);
    int32_t tok[4] = {1, 2, 3, 4}, sq[4] = {0}, pos[4] = {0, 1, 2, 3}, rows[4] = {0, 1, 2, 3}, adv[4] = {0, 1, -1, 0};
    mn_batch b = {4, tok, sq, pos, 4, rows};
    mn_batch_lora lb = {adv, (const mn_lora *const *)ad, 2};
    float want[4 * 260], got[4 * 260];
    assert_int_equal(mn_tp_run_lora(t, &b, &lb, want, &eb), MN_OK);
    mn_tp_free(t);
    int n_fail = 0;
    for (long k = 0; k < 5000; k++) {
        const long live = mn_alloc_live();
        assert_int_equal(mn_tp_new(path, &p, &t, &eb), MN_OK);
        mn_alloc_fail_after(k);
        mn_err e = mn_tp_run_lora(t, &b, &lb, got, &eb);
        mn_alloc_fail_after(-1);
        mn_tp_free(t);
        assert_int_equal(mn_alloc_live(), live);
        if (e == MN_OK) {
            assert_memory_equal(got, want, sizeof want);
            break;
        }
        if (e != MN_ENOMEM) fail_msg("fail after %ld: %s %s", k, mn_err_name(e), eb.msg);
        n_fail++;
    }
    printf("  %d allocation failures in a first TP batch with adapters, each MN_ENOMEM\n", n_fail);
    assert_true(n_fail > 0);
    for (int i = 0; i < 2; i++) mn_lora_free(ad[i]);
    adapters_rm(&a);
    unlink(path);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_synthetic_mixed),
        cmocka_unit_test(test_smollm2_tp3),
        cmocka_unit_test(test_alloc_failures_lora),
    };
    if (getenv("MNEME_TEST_SKIP")) cmocka_set_skip_filter(getenv("MNEME_TEST_SKIP"));
    return cmocka_run_group_tests(tests, NULL, NULL);
}
