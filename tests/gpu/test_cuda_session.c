/* tests/gpu/test_cuda_session.c — sessions on the CUDA backend: the KV swap round trips.
 *
 * Input: $MNEME_GPU_E2E_DIR/model.gguf (tests/gpu/make_e2e_data.sh: a small synthetic
 * llama model, F32 weights). One engine on the device, T1 images pinned (the default on a
 * GPU backend). A session A of 45 tokens is forked into R (R shares A's blocks), then A
 * leaves the pool and comes back, and both get the same 3 tokens in steps of the same
 * shape: A's logits must equal R's bit for bit (the same KV bits, the same computation):
 *   - T1 pinned, restored layer by layer (submit, then steps: the forward's layer l waits
 *     on the device for layer l's copy) while a third session decodes in the same batch;
 *   - T1 by background idle demotion (the copy out is only enqueued; the blocks are held
 *     until it is done), then restored;
 *   - T2 (lz4 in host memory) and T3 (a file), restored through the tier worker.
 * Then pinned bytes are back to zero. Exact equality holds because a decode row's bits do
 * not depend on the batch (the GEMV path for T <= 8 and the attention kernel) — a swap that
 * lost or reordered a byte changes them.
 * gt_session_e2e(device) also runs on "cpu" (the same checks; how the test was checked
 * without a GPU). Without $MNEME_GPU_E2E_DIR it prints a skip line and passes.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/backend.h"
#include "engine/model.h"
#include "engine/session.h"
#include "tests/gpu/session_util.h"

int gt_session_e2e(const char *device);

#define FAIL(...)                                            \
    do {                                                     \
        printf("session   FAILED: " __VA_ARGS__);            \
        printf("\n");                                        \
        goto out;                                            \
    } while (0)

int gt_session_e2e(const char *device) {
    const char *dir = getenv("MNEME_GPU_E2E_DIR");
    if (!dir) {
        printf("session   skipped (no MNEME_GPU_E2E_DIR: tests/gpu/make_e2e_data.sh makes the model)\n");
        return 1;
    }
    char path[4096], pdir[] = "/tmp/mneme-gpu-session-XXXXXX";
    snprintf(path, sizeof path, "%s/model.gguf", dir);
    int ok = 0;
    mn_errbuf eb = {{0}};
    mn_backend *be = NULL;
    mn_model *m = NULL;
    mn_engine *e = NULL;
    mn_session *a = NULL, *r = NULL, *b = NULL;
    if (!mkdtemp(pdir)) FAIL("mkdtemp");
    mn_backend_params bp = {.device = device, .n_threads = 2};
    if (mn_backend_new(&bp, &be, NULL, &eb) != MN_OK) FAIL("backend %s: %s", device, eb.msg);
    if (mn_model_load(path, be, NULL, &m, &eb) != MN_OK) FAIL("%s: %s", path, eb.msg);
    int32_t V = m->cfg.n_vocab;
    mn_engine_params ep = {.block_size = 16, .n_blocks = 64, .max_batch_tokens = 64, .persist_dir = pdir,
                           .t1_memory = MN_T1_PINNED};
    if (mn_engine_new(m, &ep, &e, &eb) != MN_OK) FAIL("engine: %s", eb.msg);
    int32_t hist[45], more[3] = {11, 250, 3};
    for (int i = 0; i < 45; i++) hist[i] = (i * 37 + 5) % V;
    if (mn_session_create(e, NULL, &a, &eb) != MN_OK || mn_session_create(e, NULL, &b, &eb) != MN_OK) FAIL("%s", eb.msg);
    if (mn_session_append_tokens(e, a, hist, 45, MN_ROLE_NONE, &eb) != MN_OK) FAIL("append: %s", eb.msg);
    if (mn_session_append_tokens(e, b, hist, 5, MN_ROLE_NONE, &eb) != MN_OK) FAIL("append: %s", eb.msg);
    static const char *const what[] = {"T1 pinned, layer-wise restore", "T1 by background idle demotion",
                                       "T2 (lz4 host)", "T3 (file)"};
    for (int round = 0; round < 4; round++) {
        int32_t n0;
        mn_session_tokens(a, NULL, &n0);
        if (mn_session_fork(e, a, &r, &eb) != MN_OK) FAIL("fork: %s", eb.msg);
        if (round == 1) {
            mn_session_info info;
            mn_session_info_get(e, a, &info);
            /* idle > 1x the threshold: T1 wanted (b, idle too, may move as well) */
            if (mn_engine_demote_idle(e, 1e-3, info.last_use + 1.5e-3, &eb) != MN_OK) FAIL("demote_idle: %s", eb.msg);
        } else {
            int tier = round == 0 ? 1 : round;
            if (mn_session_demote(e, a, tier, &eb) != MN_OK) FAIL("demote to T%d: %s", tier, eb.msg);
        }
        mn_session_info info;
        mn_session_info_get(e, a, &info);
        const char *want = round <= 1 ? "T1" : round == 2 ? "T2" : "T3";
        if (strcmp(info.tier, want) != 0) FAIL("%s: a is in %s", what[round], info.tier);
        if (round == 0 && mn_backend_used(be, MN_MEM_HOST_PINNED) == 0) FAIL("T1 image not pinned");
        if (!gs_same_after(e, a, r, round == 0 ? b : NULL, more, 3, V, &eb))
            FAIL("%s: logits differ from the session that never moved (%s)", what[round], eb.msg);
        mn_session_info_get(e, a, &info);
        if (strcmp(info.tier, "T0") != 0) FAIL("%s: not promoted (%s)", what[round], info.tier);
        printf("session   %-34s bit-identical to the unmoved fork  ok\n", what[round]);
        mn_session_delete(e, r);
        r = NULL;
        if (mn_session_rewind(e, a, n0, &eb) != MN_OK) FAIL("rewind: %s", eb.msg);
    }
    mn_session_delete(e, b); /* an idle demotion may have moved it to T1 as well */
    b = NULL;
    if (mn_backend_used(be, MN_MEM_HOST_PINNED) != 0)
        FAIL("%zu pinned bytes still held after every session came back", mn_backend_used(be, MN_MEM_HOST_PINNED));
    ok = 1;
out:
    if (e) {
        if (r) mn_session_delete(e, r);
        if (a) mn_session_delete(e, a);
        if (b) mn_session_delete(e, b);
        mn_engine_free(e);
    }
    mn_model_free(m);
    mn_backend_free(be);
    rmdir(pdir);
    return ok;
}
