/* tests/gpu/test_cuda_tp.c — tensor parallelism on GPUs over NCCL (engine/tp.h, "cuda").
 *
 * Input: $MNEME_GPU_E2E_DIR/model.gguf (4 heads, 2 KV heads: P = 2 divides them). With two
 * or more GPUs: a 9-token prompt, then 8 greedy steps, on TP = 2 (GPUs 0 and 1, NCCL
 * all-reduce on each rank's compute stream) against TP = 1: the same greedy tokens and
 * logits within BOUND (the row-parallel sums are reordered, and NCCL's ring order is not
 * the rank order). With one GPU only the 1-rank group runs (NCCL of size 1 is the plain
 * forward: a check that a "cuda" group builds, runs and frees). Prints a skip line without
 * the e2e model. BOUND is not measured yet (no multi-GPU machine so far): tighten it to a
 * few times the printed error after the first run.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>

#include "engine/tp.h"

int gt_tp_e2e(void);

#define BOUND 2e-3
enum { PLEN = 9, STEPS = 8 };

static int32_t argmax(const float *x, int32_t n) {
    int32_t b = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

/* prompt then STEPS greedy steps; logits of every step into out[STEPS + 1][V] */
static mn_err run(int P, const char *path, int32_t *toks, float *out, int32_t *V, mn_errbuf *eb) {
    mn_tp_params p = {.n_ranks = P, .device = "cuda", .n_threads = 1, .block_size = 16, .n_blocks = 8, .n_seqs = 1};
    mn_tp *t = NULL;
    mn_err e = mn_tp_new(path, &p, &t, eb);
    if (e != MN_OK) return e;
    *V = mn_tp_model(t)->cfg.n_vocab;
    int32_t tok[PLEN], seq[PLEN] = {0}, pos[PLEN], last = PLEN - 1;
    for (int i = 0; i < PLEN; i++) tok[i] = (i * 53 + 11) % *V, pos[i] = i;
    mn_batch b = {PLEN, tok, seq, pos, 1, &last};
    e = mn_tp_run(t, &b, out, eb);
    for (int s = 0; s < STEPS && e == MN_OK; s++) {
        int32_t next = argmax(out + (size_t)s * *V, *V), p1 = PLEN + s, zero = 0;
        toks[s] = next;
        mn_batch d = {1, &next, &zero, &p1, 1, &zero};
        e = mn_tp_run(t, &d, out + (size_t)(s + 1) * *V, eb);
    }
    mn_tp_free(t);
    return e;
}

int gt_tp_e2e(void) {
    const char *dir = getenv("MNEME_GPU_E2E_DIR");
    if (!dir) {
        printf("tp        skipped (no MNEME_GPU_E2E_DIR)\n");
        return 1;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/model.gguf", dir);
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) count = 0;
    int P = count >= 2 ? 2 : 1;
    enum { VMAX = 4096 };
    static float one[(STEPS + 1) * VMAX], two[(STEPS + 1) * VMAX];
    int32_t t1[STEPS], t2[STEPS], V = 0;
    mn_errbuf eb = {{0}};
    if (run(1, path, t1, one, &V, &eb) != MN_OK || V > VMAX) {
        printf("tp        FAILED: one rank on cuda: %s\n", eb.msg);
        return 0;
    }
    if (P == 1) {
        printf("tp        one GPU: a 1-rank NCCL group ran %d steps (TP = 2 needs two GPUs: not checked)  ok\n", STEPS);
        return 1;
    }
    if (run(2, path, t2, two, &V, &eb) != MN_OK) {
        printf("tp        FAILED: two ranks (GPUs 0, 1) over NCCL: %s\n", eb.msg);
        return 0;
    }
    double worst = 0;
    for (int s = 0; s <= STEPS; s++) {
        double mx = 0, err = 0;
        for (int32_t i = 0; i < V; i++) {
            mx = fmax(mx, fabs(one[(size_t)s * V + i]));
            err = fmax(err, fabs((double)one[(size_t)s * V + i] - two[(size_t)s * V + i]));
        }
        worst = fmax(worst, err / (mx > 0 ? mx : 1));
    }
    int same = memcmp(t1, t2, sizeof t1) == 0;
    printf("tp        TP=2 over NCCL vs TP=1: greedy %s, logits row-max rel err %.2e (bound %.0e)  %s\n",
           same ? "equal" : "DIFFER", worst, BOUND, same && worst <= BOUND ? "ok" : "FAILED");
    return same && worst <= BOUND;
}
