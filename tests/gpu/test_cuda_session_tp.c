/* tests/gpu/test_cuda_session_tp.c — the session engine over a tensor-parallel group on
 * GPUs (mn_engine_new_tp over mn_tp "cuda": what `mneme serve --tp N --device cuda` runs).
 *
 * Input: $MNEME_GPU_E2E_DIR/model.gguf (4 heads, 2 KV heads). P = 2 with two GPUs or more
 * (NCCL), else P = 1 (a 1-rank NCCL group: the engine's TP paths — block tables copied to
 * the ranks, mirrored copy-on-write, tier copies through every rank's pool — with one GPU).
 *   1. greedy: a 20-token prompt then 8 greedy tokens on the group engine against a plain
 *      engine on one backend of the same device: the same tokens, and the last logits
 *      bit-identical at P = 1, within BOUND of the row max at P = 2 (TP reorders sums);
 *   2. a 45-token session is forked (the fork shares its blocks), then leaves the pools
 *      for T1, T2 and T3 in turn and comes back; after the same 3 tokens its logits equal
 *      the unmoved fork's bit for bit.
 * gt_session_tp(device) also runs on "cpu" (P = 2 CPU ranks): how it was checked without
 * a GPU. Without $MNEME_GPU_E2E_DIR it prints a skip line and passes.
 */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/backend.h"
#include "engine/model.h"
#include "engine/session.h"
#include "tests/gpu/session_util.h"
#include "engine/tp.h"

#ifdef MNEME_HAVE_CUDA
#include <cuda_runtime.h>
#endif

int gt_session_tp(const char *device);

#define BOUND 2e-3
enum { PLEN = 20, GEN = 8, HIST = 45 };

#define FAIL(...)                                            \
    do {                                                     \
        printf("sess-tp   FAILED: " __VA_ARGS__);            \
        printf("\n");                                        \
        goto out;                                            \
    } while (0)

typedef struct gen_rec { int32_t tok[GEN]; int n; } gen_rec;

static bool on_token(void *ud, int32_t tok, const char *piece, size_t len, const mn_sample_info *info) {
    gen_rec *g = ud;
    if (g->n < GEN) g->tok[g->n++] = tok;
    return true;
}

/* prompt, then GEN greedy tokens; the tokens in g, the logits after them into logits */
static bool greedy(mn_engine *e, const int32_t *prompt, gen_rec *g, float *logits, int32_t V, mn_errbuf *eb) {
    mn_session *s;
    if (mn_session_create(e, NULL, &s, eb) != MN_OK) return false;
    mn_gen_params gp = {0};
    gp.sampling = mn_sampling_defaults();
    gp.sampling.temperature = 0;
    gp.max_tokens = GEN;
    bool ok = mn_session_append_tokens(e, s, prompt, PLEN, MN_ROLE_NONE, eb) == MN_OK &&
              mn_session_generate(e, s, &gp, on_token, g, NULL, eb) == MN_OK && mn_session_logits(s);
    if (ok) memcpy(logits, mn_session_logits(s), (size_t)V * sizeof(float));
    mn_session_delete(e, s);
    return ok;
}

int gt_session_tp(const char *device) {
    const char *dir = getenv("MNEME_GPU_E2E_DIR");
    if (!dir) {
        printf("sess-tp   skipped (no MNEME_GPU_E2E_DIR: tests/gpu/make_e2e_data.sh makes the model)\n");
        return 1;
    }
    bool cuda = strcmp(device, "cpu") != 0;
    int P = 2;
#ifdef MNEME_HAVE_CUDA
    int count = 0;
    if (cuda && (cudaGetDeviceCount(&count) != cudaSuccess || count < 2)) P = 1;
#endif
    char path[4096], pdir[] = "/tmp/mneme-gpu-sesstp-XXXXXX";
    snprintf(path, sizeof path, "%s/model.gguf", dir);
    int ok = 0;
    mn_errbuf eb = {{0}};
    mn_backend *be = NULL;
    mn_model *m = NULL;
    mn_tp *tp = NULL;
    mn_engine *plain = NULL, *e = NULL;
    mn_session *a = NULL, *r = NULL;
    float *l1 = NULL, *lp = NULL;
    if (!mkdtemp(pdir)) FAIL("mkdtemp");
    mn_backend_params bp = {.device = device, .n_threads = 1};
    if (mn_backend_new(&bp, &be, NULL, &eb) != MN_OK) FAIL("backend %s: %s", device, eb.msg);
    if (mn_model_load(path, be, NULL, &m, &eb) != MN_OK) FAIL("%s: %s", path, eb.msg);
    const int32_t V = m->cfg.n_vocab;
    mn_engine_params ep = {.block_size = 16, .n_blocks = 64, .max_batch_tokens = 64};
    if (mn_engine_new(m, &ep, &plain, &eb) != MN_OK) FAIL("plain engine: %s", eb.msg);
    mn_tp_params tpp = {.n_ranks = P, .device = cuda ? "cuda" : "cpu", .n_threads = 1, .block_size = 16, .n_blocks = 64,
                        .n_seqs = 1};
    if (mn_tp_new(path, &tpp, &tp, &eb) != MN_OK) FAIL("tp group of %d on %s: %s", P, device, eb.msg);
    mn_engine_params tep = {.max_batch_tokens = 64, .persist_dir = pdir};
    if (mn_engine_new_tp(tp, &tep, &e, &eb) != MN_OK) FAIL("engine over the group: %s", eb.msg);

    /* 1. greedy against the plain engine */
    int32_t prompt[PLEN];
    for (int i = 0; i < PLEN; i++) prompt[i] = (i * 41 + 7) % V;
    gen_rec g1 = {0}, gp = {0};
    l1 = malloc((size_t)V * sizeof(float));
    lp = malloc((size_t)V * sizeof(float));
    if (!l1 || !lp) FAIL("out of memory");
    if (!greedy(plain, prompt, &g1, l1, V, &eb)) FAIL("plain engine greedy: %s", eb.msg);
    if (!greedy(e, prompt, &gp, lp, V, &eb)) FAIL("group engine greedy: %s", eb.msg);
    double mx = 0, err = 0;
    for (int32_t i = 0; i < V; i++) {
        mx = fmax(mx, fabs(l1[i]));
        err = fmax(err, fabs((double)l1[i] - lp[i]));
    }
    const double rel = err / (mx > 0 ? mx : 1);
    const bool same = g1.n > 0 && g1.n == gp.n && memcmp(g1.tok, gp.tok, (size_t)g1.n * sizeof g1.tok[0]) == 0; /* an EOG may end both early */
    if (!same || (P == 1 ? err != 0 : rel > BOUND))
        FAIL("P=%d greedy %s, logits rel err %.2e (allowed %s)", P, same ? "equal" : "DIFFER", rel,
             P == 1 ? "0: one rank is the plain forward" : "2e-3");
    printf("sess-tp   P=%d on %s: %d greedy tokens equal to one backend, logits rel err %.2e  ok\n", P, device, g1.n, rel);

    /* 2. tier round trips against an unmoved fork */
    int32_t hist[HIST], more[3] = {11, 250, 3};
    for (int i = 0; i < HIST; i++) hist[i] = (i * 37 + 5) % V;
    if (mn_session_create(e, NULL, &a, &eb) != MN_OK) FAIL("%s", eb.msg);
    if (mn_session_append_tokens(e, a, hist, HIST, MN_ROLE_NONE, &eb) != MN_OK) FAIL("append: %s", eb.msg);
    for (int tier = 1; tier <= 3; tier++) {
        int32_t n0;
        mn_session_tokens(a, NULL, &n0);
        if (mn_session_fork(e, a, &r, &eb) != MN_OK) FAIL("fork: %s", eb.msg);
        if (mn_session_demote(e, a, tier, &eb) != MN_OK) FAIL("demote to T%d: %s", tier, eb.msg);
        mn_session_info info;
        mn_session_info_get(e, a, &info);
        char want[4];
        snprintf(want, sizeof want, "T%d", tier);
        if (strcmp(info.tier, want) != 0) FAIL("demoted to %s, found in %s", want, info.tier);
        if (!gs_same_after(e, a, r, NULL, more, 3, V, &eb)) FAIL("T%d: logits differ from the unmoved fork (%s)", tier, eb.msg);
        mn_session_info_get(e, a, &info);
        if (strcmp(info.tier, "T0") != 0) FAIL("T%d: not promoted (%s)", tier, info.tier);
        printf("sess-tp   P=%d T%d round trip bit-identical to the unmoved fork  ok\n", P, tier);
        mn_session_delete(e, r);
        r = NULL;
        if (mn_session_rewind(e, a, n0, &eb) != MN_OK) FAIL("rewind: %s", eb.msg);
    }
    ok = 1;
out:
    if (e) {
        if (r) mn_session_delete(e, r);
        if (a) mn_session_delete(e, a);
        mn_engine_free(e);
    }
    mn_engine_free(plain);
    mn_tp_free(tp);
    mn_model_free(m);
    mn_backend_free(be);
    free(l1);
    free(lp);
    rmdir(pdir);
    return ok;
}
