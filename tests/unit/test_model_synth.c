/* tests/unit/test_model_synth.c — the synthetic model (random weights of a given shape)
 * that the GPU benchmarks build at Llama-3-8B size: here at a small shape on the CPU.
 *
 * Checked: its logits are finite and spread (the scales keep activations sane through the
 * layers), the same seed gives the same bits and another seed other logits, the weight
 * bytes are what the shape says, bad shapes and types are refused naming them, and an
 * engine serves it by token ids while text and generation (no tokenizer) are refused. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/alloc.h"
#include "engine/forward.h"
#include "engine/kv.h"
#include "engine/model.h"
#include "engine/session.h"

static mn_model_config shape(void) {
    mn_model_config c;
    memset(&c, 0, sizeof c);
    c.n_layer = 3;
    c.n_embd = 128;
    c.n_head = 4;
    c.n_kv_head = 2;
    c.head_dim = 32;
    c.n_ff = 256;
    c.n_vocab = 500;
    c.n_ctx_train = 256;
    return c;
}

/* logits of the last of 7 tokens, malloc'ed */
static float *run(mn_backend *be, mn_dtype type, uint64_t seed) {
    mn_errbuf eb;
    mn_model *m;
    mn_model_config c = shape();
    if (mn_model_synthetic(be, &c, type, seed, &m, &eb) != MN_OK) fail_msg("%s", eb.msg);
    mn_kv_pool *kv;
    mn_forward *f;
    assert_int_equal(mn_kv_pool_new(be, c.n_layer, c.n_kv_head, c.head_dim, 16, 8, &kv, &eb), MN_OK);
    assert_int_equal(mn_forward_new(m, kv, &f, &eb), MN_OK);
    mn_kv_seq seq = {0}, *seqs[1] = {&seq};
    int32_t tok[7] = {1, 77, 300, 2, 499, 12, 5}, sq[7] = {0}, pos[7] = {0, 1, 2, 3, 4, 5, 6}, last = 6;
    float *out = malloc(500 * sizeof(float));
    if (mn_forward_run(f, seqs, 1, &(mn_batch){7, tok, sq, pos, 1, &last}, out, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (type == MN_Q4_0) {
        int64_t rb = mn_dtype_row_bytes(MN_Q4_0, 128), rbf = mn_dtype_row_bytes(MN_Q4_0, 256);
        uint64_t want = (uint64_t)(3 * (rb * (128 + 2 * 64 + 2 * 256) + rb * 128 + rbf * 128) + 2 * rb * 500);
        assert_int_equal(mn_model_weight_bytes(m), want);
    }
    mn_kv_seq_release(kv, &seq);
    mn_forward_free(f);
    mn_kv_pool_free(kv);
    mn_model_free(m);
    return out;
}

static void test_synthetic_forward(void **state) {
    mn_backend *be;
    mn_errbuf eb;
    mn_backend_params bp = {.device = "cpu", .n_threads = 2};
    assert_int_equal(mn_backend_cpu_new(&bp, &be, &eb), MN_OK);
    static const mn_dtype types[] = {MN_Q4_0, MN_Q8_0, MN_F16, MN_BF16, MN_F32};
    for (int t = 0; t < 5; t++) {
        float *a = run(be, types[t], 7), *b = run(be, types[t], 7), *c = run(be, types[t], 8);
        double lo = 1e30, hi = -1e30;
        for (int i = 0; i < 500; i++) {
            if (!isfinite(a[i])) fail_msg("%s: logit %d is %g", mn_dtype_name(types[t]), i, a[i]);
            lo = fmin(lo, a[i]);
            hi = fmax(hi, a[i]);
        }
        assert_true(hi - lo > 1e-3);                              /* not collapsed to a constant */
        assert_memory_equal(a, b, 500 * sizeof(float));           /* same seed, same bits */
        assert_true(memcmp(a, c, 500 * sizeof(float)) != 0);      /* another seed */
        free(a);
        free(b);
        free(c);
    }
    mn_backend_free(be);
}

static void test_synthetic_refusals_and_engine(void **state) {
    mn_backend *be;
    mn_errbuf eb;
    mn_backend_params bp = {.device = "cpu", .n_threads = 1};
    assert_int_equal(mn_backend_cpu_new(&bp, &be, &eb), MN_OK);
    const long live = mn_alloc_live();
    mn_model *m = NULL;
    mn_model_config c = shape();
    assert_int_equal(mn_model_synthetic(be, &c, MN_Q4_K, 1, &m, &eb), MN_EUNSUPPORTED);
    assert_non_null(strstr(eb.msg, "Q4_K"));
    c.n_kv_head = 3;
    assert_int_equal(mn_model_synthetic(be, &c, MN_Q4_0, 1, &m, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "heads 4/3"));
    c = shape();
    c.n_ff = 100; /* not whole Q4_0 blocks */
    assert_int_equal(mn_model_synthetic(be, &c, MN_Q4_0, 1, &m, &eb), MN_EINVALID);
    assert_non_null(strstr(eb.msg, "ff 100"));
    assert_null(m);
    assert_int_equal(mn_alloc_live(), live);

    c = shape();
    assert_int_equal(mn_model_synthetic(be, &c, MN_Q4_0, 3, &m, &eb), MN_OK);
    mn_engine *e;
    mn_engine_params ep = {.block_size = 16, .n_blocks = 16, .max_batch_tokens = 64};
    assert_int_equal(mn_engine_new(m, &ep, &e, &eb), MN_OK);
    mn_session *s;
    assert_int_equal(mn_session_create(e, NULL, &s, &eb), MN_OK);
    int32_t toks[20];
    for (int i = 0; i < 20; i++) toks[i] = (i * 31) % 500;
    assert_int_equal(mn_session_append_tokens(e, s, toks, 20, MN_ROLE_NONE, &eb), MN_OK);
    assert_non_null(mn_session_logits(s));
    assert_int_equal(mn_session_append_text(e, s, MN_ROLE_USER, "hi", 2, &eb), MN_EUNSUPPORTED);
    assert_non_null(strstr(eb.msg, "no tokenizer"));
    mn_gen_params g = {0};
    g.sampling = mn_sampling_defaults();
    g.max_tokens = 2;
    assert_int_equal(mn_session_generate(e, s, &g, NULL, NULL, NULL, &eb), MN_EUNSUPPORTED);
    assert_int_equal(mn_session_demote(e, s, 1, &eb), MN_OK); /* tiers work by token too */
    assert_int_equal(mn_session_append_tokens(e, s, toks, 3, MN_ROLE_NONE, &eb), MN_OK);
    mn_engine_free(e);
    mn_model_free(m);
    mn_backend_free(be);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_synthetic_forward),
        cmocka_unit_test(test_synthetic_refusals_and_engine),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
