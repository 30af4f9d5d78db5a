/* tests/gpu/test_cuda_session_sample.c — sampling inside the engine step on the device.
 *
 * tests/unit/gen_compare.h on the given backend: eight sessions in shared batches with
 * mixed parameters (greedy; temperature with top-k / top-p / min-p and seeds; 3, 5 and 20
 * logprobs; a penalty and a logit bias the op cannot serve, which fall back to the host;
 * late starts mixing prefill with decode), generated once with mn_engine_params.sample_on
 * = MN_SAMPLE_ON_HOST (every row's logits copied to the host, sampled there) and once with
 * MN_SAMPLE_ON_BACKEND (MN_OP_SAMPLE on the device, only token ids and logprobs copied):
 * the same tokens, logprobs within MN_SAMPLE_TOL, bit-identical final logits, and the
 * device path really taken (engine stats: tokens sampled on the backend, logits bytes).
 * On CUDA both runs read the same logits (same batches, same kernels), so the host path's
 * mn_cpu_sample and the device's mn_cuda_sample may differ only in a boundary case of the
 * ops.h contract (a draw within MN_SAMPLE_TOL of a running sum): a token mismatch here is
 * either that (rare: test_cuda_sample counts them) or a bug in the engine's plumbing.
 *
 * Models: $MNEME_GPU_E2E_DIR/model.gguf (tests/gpu/make_e2e_data.sh: a small synthetic
 * llama with a byte-level BPE tokenizer), and the default SmolLM2 when it is found
 * ($MNEME_MODEL, or ~/.cache/mneme). Neither: a skip line. gt_session_sample("cpu") runs
 * the same checks on the CPU backend (how it was checked without a GPU).
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/backend.h"
#include "engine/model.h"
#include "engine/session.h"
#include "tests/unit/gen_compare.h"
#include "tests/unit/test_model.h"

int gt_session_sample(const char *device);

/* one model: 1 passed, 0 failed */
static int one_model(const char *device, const char *path) {
    mn_errbuf eb = {{0}};
    mn_backend *be = NULL;
    mn_model *m = NULL;
    gc_result *h = NULL, *b = NULL;
    char why[1024] = "";
    int ok = 0;
    mn_backend_params bp = {.device = device, .n_threads = 2};
    if (mn_backend_new(&bp, &be, NULL, &eb) != MN_OK) {
        snprintf(why, sizeof why, "backend %s: %.400s", device, eb.msg);
    } else if (mn_model_load(path, be, NULL, &m, &eb) != MN_OK) {
        snprintf(why, sizeof why, "%.300s: %.400s", path, eb.msg);
    } else {
        gc_case cases[GC_MAX_CASES];
        mn_logit_bias bias[1];
        int32_t n = gc_standard_cases(cases, bias, m->cfg.n_vocab);
        ok = gc_run(m, MN_SAMPLE_ON_HOST, cases, n, 20, &h, why, sizeof why) &&
             gc_run(m, MN_SAMPLE_ON_BACKEND, cases, n, 20, &b, why, sizeof why) &&
             gc_compare(h, b, cases, m->cfg.n_vocab, why, sizeof why);
    }
    const char *name = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    if (ok)
        printf("session-sample %s %s: same tokens and logprobs, %lld tokens sampled on the device, %lld on the host "
               "(fallback); logits to the host %lld bytes instead of %lld  ok\n",
               device, name, (long long)b->st.sampled_backend, (long long)b->st.sampled_host,
               (long long)b->st.logits_bytes, (long long)h->st.logits_bytes);
    else
        printf("session-sample %s %s FAILED: %s\n", device, name, why);
    gc_free(h);
    gc_free(b);
    mn_model_free(m);
    mn_backend_free(be);
    return ok;
}

int gt_session_sample(const char *device) {
    const char *dir = getenv("MNEME_GPU_E2E_DIR");
    const char *smol = mn_test_model_path();
    int ran = 0, ok = 1;
    if (dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/model.gguf", dir);
        ok = one_model(device, path) && ok;
        ran++;
    }
    if (access(smol, R_OK) == 0) {
        ok = one_model(device, smol) && ok;
        ran++;
    }
    if (!ran)
        printf("session-sample skipped (no MNEME_GPU_E2E_DIR from tests/gpu/make_e2e_data.sh, no %s)\n", smol);
    return ok;
}
