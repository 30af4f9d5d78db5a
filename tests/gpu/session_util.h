/* tests/gpu/session_util.h — helpers of the GPU suite's session tests (test_cuda_session.c,
 * test_cuda_session_tp.c): run the engine until idle, and compare a moved session with an
 * unmoved fork. */
#ifndef MN_GPU_SESSION_UTIL_H
#define MN_GPU_SESSION_UTIL_H

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "engine/session.h"

static inline bool gs_step_all(mn_engine *e, mn_errbuf *eb) {
    for (int i = 0; i < 1000 && mn_engine_has_work(e); i++) {
        bool did;
        if (mn_engine_step(e, &did, eb) != MN_OK) return false;
    }
    return !mn_engine_has_work(e);
}

/* A and R get the same tokens in separate steps of the same shape (B, if given, decodes
 * in A's batch); returns whether their logits are bit-identical. */
static inline bool gs_same_after(mn_engine *e, mn_session *a, mn_session *r, mn_session *b, const int32_t *t, int n,
                                 int32_t V, mn_errbuf *eb) {
    if (mn_session_submit_tokens(e, r, t, n, MN_ROLE_NONE, eb) != MN_OK || !gs_step_all(e, eb)) return false;
    float *ref = malloc((size_t)V * sizeof(float));
    if (!ref) return false;
    memcpy(ref, mn_session_logits(r), (size_t)V * sizeof(float));
    bool ok = mn_session_submit_tokens(e, a, t, n, MN_ROLE_NONE, eb) == MN_OK;
    int32_t one = 7;
    if (ok && b) ok = mn_session_submit_tokens(e, b, &one, 1, MN_ROLE_NONE, eb) == MN_OK;
    ok = ok && gs_step_all(e, eb) && mn_session_logits(a) &&
         memcmp(ref, mn_session_logits(a), (size_t)V * sizeof(float)) == 0;
    free(ref);
    return ok;
}

#endif
