/* tests/unit/test_session_lora.c — sessions bound to LoRA adapters (real SmolLM2 model,
 * synthetic PEFT adapters from tools/gen_lora.py).
 *
 * A session's KV is made under its adapter, so: sessions of different adapters decoding
 * in one batch equal each alone; the prefix cache never hands KV made under one adapter
 * to a session of another; a saved session comes back only under the same adapter content
 * (not merely the same name). */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/session.h"
#include "tests/unit/test_model.h"

static mn_backend *be;
static mn_model *model;
static char model_path[4096], dir[64];

static void gen_adapter(const char *name, int seed, int r) {
    const char *src = getenv("MNEME_SOURCE_DIR");
    char cmd[8192];
    snprintf(cmd, sizeof cmd,
             "python3 %s/tools/gen_lora.py --model %s --r %d --alpha %d --targets q_proj,v_proj,o_proj,down_proj "
             "--seed %d %s/%s >/dev/null 2>&1",
             src && *src ? src : ".", model_path, r, 2 * r, seed, dir, name);
    if (system(cmd) != 0) fail_msg("cannot run: %s", cmd);
}

static int setup(void **state) {
    (void)state;
    snprintf(model_path, sizeof model_path, "%s", mn_test_model_path());
    if (mn_test_load_default_model(2, &be, &model) != 0) return -1;
    snprintf(dir, sizeof dir, "/tmp/mneme-test-lora-XXXXXX");
    if (!mkdtemp(dir)) return -1;
    return 0;
}

static int teardown(void **state) {
    (void)state;
    if (mn_test_remove_dir(dir) != 0) return -1;
    mn_model_free(model);
    mn_backend_free(be);
    return 0;
}

static mn_lora_registry *registry(void) {
    mn_lora_registry *r;
    mn_errbuf eb;
    if (mn_lora_registry_new(model, &r, &eb) != MN_OK) fail_msg("%s", eb.msg);
    return r;
}

static void load(mn_lora_registry *r, const char *name, const char *sub) {
    char path[256];
    snprintf(path, sizeof path, "%s/%s", dir, sub);
    int32_t idx;
    mn_errbuf eb;
    if (mn_lora_registry_load(r, name, path, &idx, &eb) != MN_OK) fail_msg("load %s: %s", name, eb.msg);
}

static mn_engine *engine(mn_lora_registry *r) {
    mn_engine *e;
    mn_errbuf eb;
    mn_engine_params p = {.block_size = 16, .n_blocks = 256, .max_batch_tokens = 256, .adapters = r};
    if (mn_engine_new(model, &p, &e, &eb) != MN_OK) fail_msg("%s", eb.msg);
    return e;
}

static mn_session *session(mn_engine *e, const char *adapter, const char *text) {
    mn_session *s;
    mn_errbuf eb;
    if (mn_session_create(e, NULL, &s, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_set_adapter(e, s, adapter, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (text && mn_session_append_text(e, s, MN_ROLE_NONE, text, strlen(text), &eb) != MN_OK) fail_msg("%s", eb.msg);
    return s;
}

static size_t logits_bytes(void) { return (size_t)model->cfg.n_vocab * sizeof(float); }

typedef struct stream {
    int32_t tok[64];
    int32_t n, n_done;
    mn_err err;
    char msg[512];
} stream;

static bool on_token(void *ud, int32_t t, const char *text, size_t len, const mn_sample_info *info) {
    (void)text, (void)len, (void)info;
    stream *st = ud;
    if (st->n < 64) st->tok[st->n++] = t;
    return true;
}

static void on_done(void *ud, const mn_gen_result *res, mn_err err, const char *msg) {
    (void)res;
    stream *st = ud;
    st->n_done++;
    st->err = err;
    snprintf(st->msg, sizeof st->msg, "%s", msg ? msg : "");
}

static mn_gen_params greedy(int32_t n) {
    mn_gen_params g = {.sampling = mn_sampling_defaults(), .max_tokens = n};
    g.sampling.temperature = 0;
    return g;
}

static void drain(mn_engine *e) {
    mn_errbuf eb;
    for (int i = 0; mn_engine_has_work(e) && i < 1000; i++) {
        bool did;
        if (mn_engine_step(e, &did, &eb) != MN_OK) fail_msg("step: %s", eb.msg);
    }
}

static const char *prompt = "The old lighthouse keeper looked at the sea and said";

static void test_adapters_in_one_batch(void **state) {
    (void)state;
    gen_adapter("a", 1, 8);
    gen_adapter("b", 2, 4);
    mn_lora_registry *r = registry();
    load(r, "A", "a");
    load(r, "B", "b");
    const char *names[3] = {"A", "B", NULL};
    stream alone[3], together[3];
    float *first[3];
    for (int i = 0; i < 3; i++) { /* each alone, in its own engine */
        mn_engine *e = engine(r);
        mn_session *s = session(e, names[i], prompt);
        first[i] = malloc(logits_bytes());
        memcpy(first[i], mn_session_logits(s), logits_bytes());
        memset(&alone[i], 0, sizeof alone[i]);
        mn_gen_params g = greedy(10);
        mn_errbuf eb;
        if (mn_session_generate(e, s, &g, on_token, &alone[i], NULL, &eb) != MN_OK) fail_msg("%s", eb.msg);
        mn_engine_free(e);
    }
    /* the adapters change the model */
    assert_memory_not_equal(first[0], first[2], logits_bytes());
    assert_memory_not_equal(first[1], first[2], logits_bytes());
    assert_memory_not_equal(first[0], first[1], logits_bytes());
    /* all three prefill and decode in the same steps */
    mn_engine *e = engine(r);
    mn_errbuf eb;
    mn_session *s[3];
    for (int i = 0; i < 3; i++) {
        s[i] = session(e, names[i], NULL);
        if (mn_session_submit_text(e, s[i], MN_ROLE_NONE, prompt, strlen(prompt), &eb) != MN_OK) fail_msg("%s", eb.msg);
        memset(&together[i], 0, sizeof together[i]);
        mn_gen_params g = greedy(10);
        if (mn_session_generate_start(e, s[i], &g, on_token, on_done, &together[i], &eb) != MN_OK) fail_msg("%s", eb.msg);
    }
    drain(e);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(together[i].n_done, 1);
        assert_int_equal(together[i].n, alone[i].n);
        assert_memory_equal(together[i].tok, alone[i].tok, (size_t)alone[i].n * sizeof(int32_t));
        free(first[i]);
    }
    /* the same batch again with the adapters paged into "device" memory under a budget
     * that holds exactly both: same tokens, and the registry counts the page-ins */
    {
        const mn_lora *la = mn_lora_registry_adapter(r, mn_lora_registry_find(r, "A"));
        const mn_lora *lb = mn_lora_registry_adapter(r, mn_lora_registry_find(r, "B"));
        assert_int_equal(mn_lora_registry_set_budget(r, be, (size_t)(la->bytes + lb->bytes), &eb), MN_OK);
        mn_engine *e2 = engine(r);
        stream paged[3];
        for (int i = 0; i < 3; i++) {
            mn_session *ps = session(e2, names[i], NULL);
            if (mn_session_submit_text(e2, ps, MN_ROLE_NONE, prompt, strlen(prompt), &eb) != MN_OK) fail_msg("%s", eb.msg);
            memset(&paged[i], 0, sizeof paged[i]);
            mn_gen_params g = greedy(10);
            if (mn_session_generate_start(e2, ps, &g, on_token, on_done, &paged[i], &eb) != MN_OK) fail_msg("%s", eb.msg);
        }
        drain(e2);
        for (int i = 0; i < 3; i++) {
            assert_int_equal(paged[i].err, MN_OK);
            assert_memory_equal(paged[i].tok, alone[i].tok, (size_t)alone[i].n * sizeof(int32_t));
        }
        mn_lora_stats st;
        mn_lora_registry_stats(r, &st);
        assert_int_equal(st.resident, 2);
        assert_true(st.page_ins >= 2);
        mn_engine_free(e2);
        assert_int_equal(mn_lora_registry_set_budget(r, NULL, 0, &eb), MN_OK);
    }
    assert_string_equal(mn_session_adapter(s[0]), "A");
    assert_null(mn_session_adapter(s[2]));
    assert_int_equal(mn_engine_adapter_users(e, "A"), 1);
    /* binding errors */
    assert_int_equal(mn_session_set_adapter(e, s[2], "A", &eb), MN_EBUSY);
    mn_session *x;
    assert_int_equal(mn_session_create(e, NULL, &x, &eb), MN_OK);
    assert_int_equal(mn_session_set_adapter(e, x, "nope", &eb), MN_ENOT_FOUND);
    assert_non_null(strstr(eb.msg, "nope"));
    mn_engine_free(e);
    mn_lora_registry_free(r);
}

static void test_prefix_cache_keeps_adapters_apart(void **state) {
    (void)state;
    gen_adapter("a", 1, 8);
    mn_lora_registry *r = registry();
    load(r, "A", "a");
    /* 3 full blocks of tokens */
    int32_t toks[49];
    for (int i = 0; i < 49; i++) toks[i] = 300 + 11 * i;
    mn_engine *e = engine(r), *ref = engine(r);
    mn_errbuf eb;
    mn_session *plain = session(e, NULL, NULL);
    assert_int_equal(mn_session_append_tokens(e, plain, toks, 49, MN_ROLE_NONE, &eb), MN_OK);
    mn_engine_stats st0, st1, st2;
    mn_engine_stats_get(e, &st0);
    mn_session *a1 = session(e, "A", NULL);
    assert_int_equal(mn_session_append_tokens(e, a1, toks, 49, MN_ROLE_NONE, &eb), MN_OK);
    mn_engine_stats_get(e, &st1);
    assert_int_equal(st1.prefix_hit_tokens, st0.prefix_hit_tokens); /* nothing borrowed from "no adapter" */
    mn_session *fresh = session(ref, "A", NULL);
    assert_int_equal(mn_session_append_tokens(ref, fresh, toks, 49, MN_ROLE_NONE, &eb), MN_OK);
    assert_memory_equal(mn_session_logits(a1), mn_session_logits(fresh), logits_bytes());
    mn_session *a2 = session(e, "A", NULL);
    assert_int_equal(mn_session_append_tokens(e, a2, toks, 49, MN_ROLE_NONE, &eb), MN_OK);
    mn_engine_stats_get(e, &st2);
    assert_int_equal(st2.prefix_hit_tokens - st1.prefix_hit_tokens, 48); /* same adapter: shared */
    assert_memory_equal(mn_session_logits(a2), mn_session_logits(fresh), logits_bytes());
    mn_engine_free(e);
    mn_engine_free(ref);
    mn_lora_registry_free(r);
}

static void test_saved_session_needs_same_adapter_content(void **state) {
    (void)state;
    gen_adapter("a", 1, 8);
    gen_adapter("a2", 7, 8); /* same shape, other weights */
    mn_lora_registry *r = registry();
    load(r, "A", "a");
    mn_engine *e = engine(r);
    mn_errbuf eb;
    mn_session *s = session(e, "A", prompt);
    char path[256];
    snprintf(path, sizeof path, "%s/s.mns", dir);
    assert_int_equal(mn_session_save(e, s, path, &eb), MN_OK);
    mn_session *back;
    assert_int_equal(mn_session_load(e, path, &back, &eb), MN_OK);
    assert_string_equal(mn_session_adapter(back), "A");
    const char *more = " and then";
    assert_int_equal(mn_session_append_text(e, s, MN_ROLE_NONE, more, strlen(more), &eb), MN_OK);
    assert_int_equal(mn_session_append_text(e, back, MN_ROLE_NONE, more, strlen(more), &eb), MN_OK);
    assert_memory_equal(mn_session_logits(s), mn_session_logits(back), logits_bytes());
    mn_session_delete(e, back);

    /* a session that is generating when its adapter goes away fails alone */
    mn_session *other = session(e, NULL, prompt);
    stream st = {0}, so = {0};
    mn_gen_params g = greedy(6);
    assert_int_equal(mn_session_generate_start(e, s, &g, on_token, on_done, &st, &eb), MN_OK);
    assert_int_equal(mn_session_generate_start(e, other, &g, on_token, on_done, &so, &eb), MN_OK);
    bool did;
    assert_int_equal(mn_engine_step(e, &did, &eb), MN_OK);
    assert_int_equal(mn_lora_registry_unload(r, "A", &eb), MN_OK);
    drain(e);
    assert_int_equal(st.n_done, 1);
    assert_int_equal(st.err, MN_EMISMATCH);
    assert_non_null(strstr(st.msg, "no longer loaded"));
    assert_int_equal(so.n_done, 1);
    assert_int_equal(so.err, MN_OK);
    assert_int_equal(so.n, 6);

    /* the same name with other weights: the saved KV is not valid under it */
    load(r, "A", "a2");
    assert_int_equal(mn_session_load(e, path, &back, &eb), MN_EMISMATCH);
    assert_non_null(strstr(eb.msg, "fingerprint"));
    assert_int_equal(mn_lora_registry_unload(r, "A", &eb), MN_OK);
    assert_int_equal(mn_session_load(e, path, &back, &eb), MN_EMISMATCH); /* none loaded */
    load(r, "A again", "a"); /* the original content under another name: fine */
    assert_int_equal(mn_session_load(e, path, &back, &eb), MN_OK);
    assert_string_equal(mn_session_adapter(back), "A again");
    mn_engine_free(e);
    mn_lora_registry_free(r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_adapters_in_one_batch),
        cmocka_unit_test(test_prefix_cache_keeps_adapters_apart),
        cmocka_unit_test(test_saved_session_needs_same_adapter_content),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
