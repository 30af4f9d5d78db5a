/* tests/unit/test_session.c — sessions on the real SmolLM2 model.
 *
 * The reference for every check is a session in a SEPARATE engine (own KV pool, own
 * prefix cache) that received the same history in one append: fork, rewind, generation
 * and prefix sharing must give bit-identical logits to it. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/alloc.h"
#include "engine/chat.h"
#include "engine/tokenizer.h"
#include "engine/session.h"
#include "tests/unit/test_model.h"

static mn_backend *be;
static mn_model *model;

static const char *model_path(void) { return mn_test_model_path(); }

static int setup(void **state) {
    (void)state;
    return mn_test_load_default_model(2, &be, &model);
}

static int teardown(void **state) {
    mn_model_free(model);
    mn_backend_free(be);
    return 0;
}

static mn_engine *engine(int32_t n_blocks) {
    mn_engine *e;
    mn_errbuf eb;
    mn_engine_params p = {.block_size = 16, .n_blocks = n_blocks, .max_batch_tokens = 256};
    if (mn_engine_new(model, &p, &e, &eb) != MN_OK) fail_msg("%s", eb.msg);
    return e;
}

/* A fresh session in engine e holding exactly the tokens of s; returns its logits copy. */
static float *fresh_logits(mn_engine *e, const mn_session *s) {
    mn_errbuf eb;
    int32_t n;
    const int32_t *t = mn_session_tokens(s, NULL, &n);
    mn_session *f;
    if (mn_session_create(e, NULL, &f, &eb) != MN_OK) fail_msg("%s", eb.msg);
    if (mn_session_append_tokens(e, f, t, n, MN_ROLE_NONE, &eb) != MN_OK) fail_msg("%s", eb.msg);
    const float *l = mn_session_logits(f);
    assert_non_null(l);
    size_t bytes = (size_t)model->cfg.n_vocab * sizeof(float);
    float *copy = malloc(bytes);
    memcpy(copy, l, bytes);
    mn_session_delete(e, f);
    return copy;
}

static void assert_logits_equal(mn_engine *ref, const mn_session *s, const char *what) {
    const float *l = mn_session_logits(s);
    if (!l) fail_msg("%s: no logits", what);
    float *f = fresh_logits(ref, s);
    if (memcmp(l, f, (size_t)model->cfg.n_vocab * sizeof(float)) != 0) fail_msg("%s: logits differ from a fresh session", what);
    free(f);
}

static void append(mn_engine *e, mn_session *s, mn_role role, const char *text) {
    mn_errbuf eb;
    if (mn_session_append_text(e, s, role, text, strlen(text), &eb) != MN_OK) fail_msg("append: %s", eb.msg);
}

static mn_gen_params greedy(int32_t n) {
    mn_gen_params g = {0};
    g.sampling = mn_sampling_defaults();
    g.sampling.temperature = 0;
    g.max_tokens = n;
    return g;
}

typedef struct { char text[4096]; size_t len; int calls; } collect;
static bool collect_cb(void *ud, int32_t tok, const char *text, size_t len, const mn_sample_info *info) {
    collect *c = ud;
    if (c->len + len < sizeof c->text) { memcpy(c->text + c->len, text, len); c->len += len; }
    c->calls++;
    return true;
}

static void test_chat_and_generate(void **state) {
    mn_engine *e = engine(256), *ref = engine(256);
    mn_errbuf eb;
    mn_session *s;
    assert_int_equal(mn_session_create(e, NULL, &s, &eb), MN_OK);
    append(e, s, MN_ROLE_USER, "What is the capital of France?");
    mn_gen_params g = greedy(16);
    g.assistant_prefix = true;
    collect c = {{0}, 0, 0};
    mn_gen_result r;
    assert_int_equal(mn_session_generate(e, s, &g, collect_cb, &c, &r, &eb), MN_OK);
    c.text[c.len] = 0;
    assert_true(r.n_generated >= 1 && r.n_generated <= 16);
    assert_int_equal(c.calls, r.n_generated);
    /* the streamed text is exactly the text of the generated tokens */
    int32_t nt;
    const int32_t *all = mn_session_tokens(s, NULL, &nt);
    char *dec = NULL;
    size_t dl = 0;
    assert_int_equal(mn_detokenize(model->tok, all + nt - r.n_generated, r.n_generated, false, &dec, &dl, &eb), MN_OK);
    if (r.finish == MN_FINISH_EOG) assert_true(dl >= c.len); /* EOG text is not streamed */
    else assert_int_equal(dl, c.len);
    assert_memory_equal(dec, c.text, c.len);
    assert_true(c.len > 0);
    mn_free(dec);
    /* generated tokens are part of the session, with role assistant; the framing includes
     * the model's default system message (first message of the conversation) */
    int32_t n;
    const uint8_t *roles;
    const int32_t *toks = mn_session_tokens(s, &roles, &n);
    assert_int_equal(roles[n - 1], MN_ROLE_ASSISTANT);
    assert_int_equal(toks[0], mn_tokenizer_find(model->tok, "<|im_start|>", 12));
    /* the session continues exactly like a fresh one with the same history */
    append(e, s, MN_ROLE_USER, "And of Italy?");
    assert_logits_equal(ref, s, "after generate + append");
    mn_engine_free(e);
    mn_engine_free(ref);
}

static void test_fork_diverge(void **state) {
    mn_engine *e = engine(256), *ref = engine(256);
    mn_errbuf eb;
    mn_session *a, *b;
    assert_int_equal(mn_session_create(e, "You are a terse assistant.", &a, &eb), MN_OK);
    append(e, a, MN_ROLE_USER, "Name a color of the sky on a clear day, in one word.");
    mn_engine_stats st0;
    mn_engine_stats_get(e, &st0);
    assert_int_equal(mn_session_fork(e, a, &b, &eb), MN_OK);
    mn_session_info ia, ib;
    mn_session_info_get(e, a, &ia);
    mn_session_info_get(e, b, &ib);
    assert_int_equal(ia.n_tokens, ib.n_tokens);
    assert_int_equal(ib.n_shared_blocks, ib.n_blocks); /* all shared, nothing copied */
    mn_engine_stats st1;
    mn_engine_stats_get(e, &st1);
    assert_int_equal(st1.blocks_free, st0.blocks_free);
    /* diverge: different continuations, each equal to a fresh session with its history */
    append(e, a, MN_ROLE_USER, "Now a color of grass.");
    append(e, b, MN_ROLE_USER, "Now a color of snow, please.");
    assert_logits_equal(ref, a, "fork branch a");
    assert_logits_equal(ref, b, "fork branch b");
    mn_gen_params g = greedy(6);
    assert_int_equal(mn_session_generate(e, b, &g, NULL, NULL, NULL, &eb), MN_OK);
    append(e, a, MN_ROLE_NONE, " more");
    assert_logits_equal(ref, a, "fork branch a after b generated");
    append(e, b, MN_ROLE_NONE, " more");
    assert_logits_equal(ref, b, "fork branch b after generating");
    mn_engine_free(e);
    mn_engine_free(ref);
}

static void test_rewind(void **state) {
    mn_engine *e = engine(256), *ref = engine(256);
    mn_errbuf eb;
    mn_session *s;
    assert_int_equal(mn_session_create(e, NULL, &s, &eb), MN_OK);
    append(e, s, MN_ROLE_USER, "Tell me a story about a dragon who learns to bake bread.");
    int32_t before;
    mn_session_tokens(s, NULL, &before);
    mn_gen_params g = greedy(20);
    g.assistant_prefix = true;
    assert_int_equal(mn_session_generate(e, s, &g, NULL, NULL, NULL, &eb), MN_OK);
    int32_t after;
    mn_session_tokens(s, NULL, &after);
    assert_true(after > before + 3);
    /* barge-in: keep 3 generated tokens, then the user speaks */
    assert_int_equal(mn_session_rewind(e, s, before + 3 + 5, &eb), MN_OK); /* +5: the assistant header */
    assert_null(mn_session_logits(s));
    append(e, s, MN_ROLE_NONE, " Wait, make it about a cat.");
    assert_logits_equal(ref, s, "rewind then append");
    /* rewind then regenerate equals generating on a fresh session with that history */
    assert_int_equal(mn_session_rewind(e, s, before, &eb), MN_OK);
    mn_gen_params g2 = greedy(8);
    g2.assistant_prefix = true;
    collect c1 = {{0}, 0, 0}, c2 = {{0}, 0, 0};
    assert_int_equal(mn_session_generate(e, s, &g2, collect_cb, &c1, NULL, &eb), MN_OK);
    int32_t n;
    const int32_t *t = mn_session_tokens(s, NULL, &n);
    mn_session *f;
    assert_int_equal(mn_session_create(ref, NULL, &f, &eb), MN_OK);
    assert_int_equal(mn_session_append_tokens(ref, f, t, before, MN_ROLE_NONE, &eb), MN_OK);
    assert_int_equal(mn_session_generate(ref, f, &g2, collect_cb, &c2, NULL, &eb), MN_OK);
    assert_int_equal(c1.len, c2.len);
    assert_memory_equal(c1.text, c2.text, c1.len);
    /* bad rewinds */
    assert_int_equal(mn_session_rewind(e, s, n + 1, &eb), MN_ERANGE);
    assert_non_null(strstr(eb.msg, "rewind position"));
    assert_int_equal(mn_session_rewind(e, s, -1, &eb), MN_ERANGE);
    mn_engine_free(e);
    mn_engine_free(ref);
}

static void test_prefix_sharing(void **state) {
    /* a ~1000-token system prompt, 16 sessions: stored once */
    char *sys = malloc(8192);
    size_t len = 0;
    for (int i = 0; len < 6000; i++)
        len += (size_t)snprintf(sys + len, 8192 - len, "Rule %d: always answer about topic %d politely. ", i, i * 7 % 13);
    mn_engine *e = engine(1024), *ref = engine(256);
    mn_errbuf eb;
    mn_session *ss[16];
    for (int i = 0; i < 16; i++) assert_int_equal(mn_session_create(e, sys, &ss[i], &eb), MN_OK);
    int32_t n;
    mn_session_tokens(ss[0], NULL, &n);
    assert_true(n >= 1000);
    mn_engine_stats st;
    mn_engine_stats_get(e, &st);
    int32_t used = st.blocks_total - st.blocks_free;
    int32_t full = n / 16;
    /* the shared prefix once, plus at most 2 private blocks per session (partial tail) */
    assert_true(used <= full + 1 + 16 * 2);
    assert_true(st.prefix_hit_tokens >= (int64_t)15 * (full - 1) * 16);
    assert_true(st.computed_tokens < 2 * n + 16 * 32);
    /* each session's own turn; deleting half of them never disturbs the others */
    for (int i = 0; i < 16; i++) {
        char q[64];
        snprintf(q, sizeof q, "Question %d: what is %d plus %d?", i, i, i + 1);
        append(e, ss[i], MN_ROLE_USER, q);
    }
    for (int i = 0; i < 16; i += 2) mn_session_delete(e, ss[i]);
    for (int i = 1; i < 16; i += 4) assert_logits_equal(ref, ss[i], "shared-prefix session after deletions");
    for (int i = 1; i < 16; i += 2) mn_session_delete(e, ss[i]);
    mn_engine_stats_get(e, &st);
    assert_int_equal(st.n_sessions, 0);
    /* only the prefix cache holds blocks now: its entries, and nothing leaked */
    assert_int_equal(st.blocks_total - st.blocks_free, st.prefix_entries);
    free(sys);
    mn_engine_free(e);
    mn_engine_free(ref);
}

static void test_bad_input(void **state) {
    mn_engine *e = engine(16); /* 256 tokens of KV */
    mn_errbuf eb;
    mn_session *s;
    assert_int_equal(mn_session_create(e, NULL, &s, &eb), MN_OK);
    append(e, s, MN_ROLE_NONE, "Hello there");
    int32_t n0;
    mn_session_tokens(s, NULL, &n0);
    int32_t bad[3] = {5, model->cfg.n_vocab, 7};
    assert_int_equal(mn_session_append_tokens(e, s, bad, 3, MN_ROLE_USER, &eb), MN_ERANGE);
    assert_non_null(strstr(eb.msg, "tokens[1]"));
    int32_t n1;
    mn_session_tokens(s, NULL, &n1);
    assert_int_equal(n1, n0);
    assert_non_null(mn_session_logits(s)); /* untouched */
    mn_gen_params g = greedy(0);
    assert_int_equal(mn_session_generate(e, s, &g, NULL, NULL, NULL, &eb), MN_ERANGE);
    assert_non_null(strstr(eb.msg, "max_tokens"));
    g = greedy(4);
    g.sampling.top_p = 1.5f;
    assert_int_equal(mn_session_generate(e, s, &g, NULL, NULL, NULL, &eb), MN_ERANGE);
    assert_non_null(strstr(eb.msg, "top_p"));
    g = greedy(model->cfg.n_ctx);
    assert_int_equal(mn_session_generate(e, s, &g, NULL, NULL, NULL, &eb), MN_ELIMIT);
    assert_non_null(strstr(eb.msg, "context length"));
    assert_null(mn_session_find(e, "00000000000000000000000000000000"));
    assert_ptr_equal(mn_session_find(e, mn_session_id(s)), s);
    assert_int_equal(strlen(mn_session_id(s)), 32);
    /* a pool too small for the append: refused, the session keeps what it had */
    char big[4000];
    memset(big, 0, sizeof big);
    for (int i = 0; i < 300; i++) strcat(big, "word ");
    assert_int_equal(mn_session_append_text(e, s, MN_ROLE_NONE, big, strlen(big), &eb) != MN_OK, 1);
    mn_session_tokens(s, NULL, &n1);
    assert_int_equal(n1, n0);
    append(e, s, MN_ROLE_NONE, " again");
    mn_engine *ref = engine(64);
    assert_logits_equal(ref, s, "after a refused append");
    mn_engine_free(ref);
    mn_engine_free(e);
}

/* T0 -> bytes -> T0, and T0 -> file -> new engine -> T0: bit-identical continuation. */
static void test_save_load(void **state) {
    mn_engine *e = engine(256);
    mn_errbuf eb;
    mn_session *a, *b;
    assert_int_equal(mn_session_create(e, "You are a helpful assistant.", &a, &eb), MN_OK);
    append(e, a, MN_ROLE_USER, "Remember the number 4172. What is it?");
    mn_gen_params g = greedy(5);
    g.assistant_prefix = true;
    assert_int_equal(mn_session_generate(e, a, &g, NULL, NULL, NULL, &eb), MN_OK);
    /* export / import in one engine */
    uint8_t *buf;
    size_t len;
    assert_int_equal(mn_session_export(e, a, &buf, &len, &eb), MN_OK);
    int32_t na;
    mn_session_tokens(a, NULL, &na);
    assert_true(len > (size_t)na * 23040 / 2); /* the KV is in there */
    assert_int_equal(mn_session_import(e, buf, len, &b, &eb), MN_OK);
    assert_string_not_equal(mn_session_id(a), mn_session_id(b));
    int32_t nb;
    const uint8_t *ra, *rb;
    const int32_t *ta = mn_session_tokens(a, &ra, &na), *tb = mn_session_tokens(b, &rb, &nb);
    assert_int_equal(na, nb);
    assert_memory_equal(ta, tb, (size_t)na * 4);
    assert_memory_equal(ra, rb, (size_t)na);
    append(e, a, MN_ROLE_USER, "Thanks!");
    append(e, b, MN_ROLE_USER, "Thanks!");
    size_t vb = (size_t)model->cfg.n_vocab * sizeof(float);
    assert_memory_equal(mn_session_logits(a), mn_session_logits(b), vb);
    /* damaged streams are refused and change nothing */
    mn_engine_stats st0, st1;
    mn_engine_stats_get(e, &st0);
    mn_session *c;
    for (size_t off = 0; off < len; off += len / 7 + 1) {
        buf[off] ^= 0x40;
        assert_int_equal(mn_session_import(e, buf, len, &c, &eb), MN_EFORMAT);
        buf[off] ^= 0x40;
    }
    assert_int_equal(mn_session_import(e, buf, len / 2, &c, &eb), MN_EFORMAT);
    mn_engine_stats_get(e, &st1);
    assert_int_equal(st1.n_sessions, st0.n_sessions);
    assert_int_equal(st1.blocks_free, st0.blocks_free);
    mn_free(buf);

    /* file, then a new engine (a restart): the restored session continues identically */
    char path[] = "/tmp/mneme-test-session-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(mn_session_save(e, a, path, &eb), MN_OK);
    append(e, a, MN_ROLE_USER, "One more question: and the number doubled?");
    float *expect = malloc(vb);
    memcpy(expect, mn_session_logits(a), vb);
    mn_engine_free(e);
    mn_engine *e2 = engine(256);
    mn_session *r;
    assert_int_equal(mn_session_load(e2, path, &r, &eb), MN_OK);
    append(e2, r, MN_ROLE_USER, "One more question: and the number doubled?");
    assert_memory_equal(mn_session_logits(r), expect, vb);
    /* a session file of another model is refused with a clear error */
    char cmd[1024], other[] = "/tmp/mneme-test-model-XXXXXX";
    fd = mkstemp(other);
    close(fd);
    snprintf(cmd, sizeof cmd, "python3 %s/tools/gen_gguf.py %s --n-layer 1 --n-embd 64 --n-head 2 --n-kv-head 1 --n-ff 64 --n-vocab 300 >/dev/null 2>&1",
             getenv("MNEME_SOURCE_DIR") ? getenv("MNEME_SOURCE_DIR") : ".", other);
    if (system(cmd) != 0) fail_msg("cannot run tools/gen_gguf.py (python3 with the gguf package is needed): %s", cmd);
    mn_model *m2;
    assert_int_equal(mn_model_load(other, be, NULL, &m2, &eb), MN_OK);
    mn_engine *e3;
    mn_engine_params p3 = {.block_size = 16, .n_blocks = 64, .max_batch_tokens = 64};
    assert_int_equal(mn_engine_new(m2, &p3, &e3, &eb), MN_OK);
    assert_int_equal(mn_session_load(e3, path, &r, &eb), MN_EMISMATCH);
    assert_non_null(strstr(eb.msg, "model"));
    mn_engine_free(e3);
    mn_model_free(m2);
    unlink(other);
    /* missing and truncated files */
    assert_int_equal(mn_session_load(e2, "/nonexistent/dir/s.mns", &r, &eb), MN_ENOT_FOUND);
    assert_int_equal(truncate(path, 100), 0);
    assert_int_equal(mn_session_load(e2, path, &r, &eb), MN_EFORMAT);
    unlink(path);
    free(expect);
    mn_engine_free(e2);
}

static mn_engine *engine_tiers(int32_t n_blocks, int64_t t1, int64_t t2, const char *dir) {
    mn_engine *e;
    mn_errbuf eb;
    mn_engine_params p = {.block_size = 16, .n_blocks = n_blocks, .max_batch_tokens = 256, .t1_budget = t1,
                          .t2_budget = t2, .persist_dir = dir};
    if (mn_engine_new(model, &p, &e, &eb) != MN_OK) fail_msg("%s", eb.msg);
    return e;
}

/* T0 -> Tn -> T0 for every tier: the KV comes back bit-exact. */
static void test_tier_round_trips(void **state) {
    char dir[] = "/tmp/mneme-test-tiers-XXXXXX";
    assert_non_null(mkdtemp(dir));
    mn_engine *e = engine_tiers(256, 0, 0, dir), *ref = engine(256);
    mn_errbuf eb;
    for (int t = 1; t <= 3; t++) {
        mn_session *s;
        assert_int_equal(mn_session_create(e, NULL, &s, &eb), MN_OK);
        char msg[128];
        snprintf(msg, sizeof msg, "Tier test %d: list three fruits.", t);
        append(e, s, MN_ROLE_USER, msg);
        mn_engine_stats a, b;
        mn_engine_stats_get(e, &a);
        assert_int_equal(mn_session_demote(e, s, t, &eb), MN_OK);
        mn_session_info info;
        mn_session_info_get(e, s, &info);
        char name[3] = {'T', (char)('0' + t), 0};
        assert_string_equal(info.tier, name);
        mn_engine_stats_get(e, &b);
        assert_true(b.blocks_free > a.blocks_free);          /* its private blocks went back */
        assert_int_equal(b.tier_sessions[t], 1);
        if (t == 3) {
            char path[256];
            snprintf(path, sizeof path, "%s/%s.mns", dir, mn_session_id(s));
            assert_int_equal(access(path, R_OK), 0);
        }
        append(e, s, MN_ROLE_USER, "Now two vegetables.");      /* promotes */
        mn_session_info_get(e, s, &info);
        assert_string_equal(info.tier, "T0");
        assert_logits_equal(ref, s, "after a tier round trip");
        mn_session_delete(e, s);
    }
    mn_engine_free(e);
    mn_engine_free(ref);
    assert_int_equal(rmdir(dir), 0); /* no session file left behind */
}

/* Idle demotion T0 -> T1 in the background: the copies out of the pool are only enqueued,
 * so with slow copies the session is T1 at once while its blocks are still held (not yet
 * free: the copy reads them), and they come back to the pool at a step after the copy.
 * A session promoted, one deleted and a new one that needs the pool while the copies are
 * in flight all stay correct. */
static void test_idle_demotion_t1_background(void **state) {
    mn_engine *e = engine(96), *ref = engine(256);
    mn_errbuf eb;
    enum { N = 3 };
    mn_session *s[N];
    for (int i = 0; i < N; i++) {
        char msg[160];
        snprintf(msg, sizeof msg, "Background copy test %d: list %d capitals in Europe and one river in each of them.", i, i + 3);
        assert_int_equal(mn_session_create(e, NULL, &s[i], &eb), MN_OK);
        append(e, s[i], MN_ROLE_USER, msg);
    }
    mn_engine_stats a, b;
    mn_engine_stats_get(e, &a);
    mn_session_info info;
    mn_session_info_get(e, s[N - 1], &info);
    mn_backend_cpu_slow_copies(be, 3000);
    assert_int_equal(mn_engine_demote_idle(e, 1000.0, info.last_use + 1500.0, &eb), MN_OK); /* T1 wanted */
    mn_engine_stats_get(e, &b);
    assert_int_equal(b.tier_sessions[1], N);
    assert_int_equal(b.blocks_free, a.blocks_free); /* held: their copies are still queued */
    mn_session_delete(e, s[1]);                       /* deleted while its copy is queued */
    s[1] = NULL;
    mn_session *big;                                  /* needs most of the pool: must wait for the drains */
    assert_int_equal(mn_session_create(e, NULL, &big, &eb), MN_OK);
    static int32_t toks[1400];
    for (int i = 0; i < 1400; i++) toks[i] = 200 + (i * 37) % 5000;
    assert_int_equal(mn_session_append_tokens(e, big, toks, 1400, MN_ROLE_USER, &eb), MN_OK);
    append(e, s[0], MN_ROLE_USER, "And in Asia?");    /* promoted from T1 */
    mn_backend_cpu_slow_copies(be, 0);
    assert_logits_equal(ref, s[0], "promoted after a background demotion");
    assert_logits_equal(ref, big, "a session that needed the draining blocks");
    mn_session_delete(e, big);
    append(e, s[2], MN_ROLE_USER, "And in Africa?");
    assert_logits_equal(ref, s[2], "after a background demotion");
    mn_session_delete(e, s[0]);
    mn_session_delete(e, s[2]);
    bool did;
    assert_int_equal(mn_engine_step(e, &did, &eb), MN_OK);
    mn_engine_stats_get(e, &b);
    assert_int_equal(b.blocks_free + b.prefix_entries, 96); /* every block came back (or is cached) */
    mn_engine_free(e);
    mn_engine_free(ref);
}

/* A saved file listed lazily (what a restarted server does with its saved sessions): T3
 * until first use, equal to a fresh session after it; a kept file stays the caller's
 * (still there after promotion and deletion, never rewritten); an unkept one goes once
 * the session is promoted; a damaged file is refused and nothing is listed. */
static void test_adopt_file(void **state) {
    char dir[] = "/tmp/mneme-test-adopt-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char kept[256], given[256], bad[256];
    snprintf(kept, sizeof kept, "%s/kept.mns", dir);
    snprintf(given, sizeof given, "%s/given.mns", dir);
    snprintf(bad, sizeof bad, "%s/bad.mns", dir);
    mn_engine *e = engine(256), *ref = engine(256);
    mn_errbuf eb;
    mn_session *s;
    assert_int_equal(mn_session_create(e, NULL, &s, &eb), MN_OK);
    append(e, s, MN_ROLE_USER, "Adopt me lazily: the capital of France is Paris.");
    assert_int_equal(mn_session_save(e, s, kept, &eb), MN_OK);
    assert_int_equal(mn_session_save(e, s, given, &eb), MN_OK);
    mn_session_delete(e, s);
    FILE *f = fopen(kept, "rb"), *g = fopen(bad, "wb");
    static char buf[1 << 22];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    assert_true(n > 0 && n < sizeof buf);
    buf[n / 2] ^= 0x5a; /* one flipped byte in the middle: a block checksum fails */
    fwrite(buf, 1, n, g);
    fclose(g);
    struct stat st0, st1;
    assert_int_equal(stat(kept, &st0), 0);

    mn_engine_stats a, b;
    mn_engine_stats_get(e, &a);
    mn_session *k, *u, *x = NULL;
    assert_int_equal(mn_session_adopt_file(e, kept, true, &k, &eb), MN_OK);
    assert_int_equal(mn_session_adopt_file(e, given, false, &u, &eb), MN_OK);
    mn_engine_stats_get(e, &b);
    assert_int_equal(b.blocks_free, a.blocks_free); /* listed, not loaded */
    mn_session_info info;
    mn_session_info_get(e, k, &info);
    assert_string_equal(info.tier, "T3");
    assert_string_equal(mn_session_source_file(k), kept);
    assert_null(mn_session_source_file(u)); /* not the caller's */
    assert_int_not_equal(mn_session_adopt_file(e, bad, true, &x, &eb), MN_OK);
    assert_null(x);
    assert_non_null(strstr(eb.msg, "checksum"));
    append(e, k, MN_ROLE_USER, "And of Italy?");
    append(e, u, MN_ROLE_USER, "And of Italy?");
    assert_logits_equal(ref, k, "adopted with the file kept");
    assert_logits_equal(ref, u, "adopted with the file given");
    assert_null(mn_session_source_file(k)); /* promoted: it has moved on from the file */
    assert_int_equal(access(kept, R_OK), 0);
    assert_int_equal(stat(kept, &st1), 0);
    assert_int_equal(st1.st_size, st0.st_size);
    assert_true(st1.st_mtim.tv_sec == st0.st_mtim.tv_sec && st1.st_mtim.tv_nsec == st0.st_mtim.tv_nsec);
    assert_int_equal(access(given, F_OK), -1); /* the engine's to delete: gone on promotion */
    mn_session_delete(e, k);
    assert_int_equal(access(kept, R_OK), 0);
    mn_session *k2;
    assert_int_equal(mn_session_adopt_file(e, kept, true, &k2, &eb), MN_OK);
    mn_session_delete(e, k2); /* deleting a listed session leaves the caller's file */
    assert_int_equal(access(kept, R_OK), 0);
    mn_session_delete(e, u);
    mn_engine_free(e);
    mn_engine_free(ref);
    unlink(kept);
    unlink(bad);
    assert_int_equal(rmdir(dir), 0);
}

/* A T3 file that changes under a listed session: on the CPU backend its blocks go straight
 * into pool blocks as they are read, so a bad chunk late in the file is found after earlier
 * blocks were written. The promotion must fail with the reader's error, give every block
 * back and leave the session in T3; a file of another (shorter) session is refused before
 * any block is written; with the right bytes back the session restores bit-exact. */
static void test_t3_file_changed(void **state) {
    char dir[] = "/tmp/mneme-test-t3chg-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[256], other[256];
    snprintf(path, sizeof path, "%s/s.mns", dir);
    snprintf(other, sizeof other, "%s/o.mns", dir);
    mn_engine *e = engine(256), *ref = engine(256);
    mn_errbuf eb;
    mn_session *s, *o;
    assert_int_equal(mn_session_create(e, NULL, &s, &eb), MN_OK);
    append(e, s, MN_ROLE_USER, "A session long enough for several KV blocks: the rivers of Europe, the Danube, the "
                               "Rhine, the Elbe, the Loire, the Po and the Vistula, in order of length.");
    assert_int_equal(mn_session_save(e, s, path, &eb), MN_OK);
    mn_session_delete(e, s);
    assert_int_equal(mn_session_create(e, NULL, &o, &eb), MN_OK);
    append(e, o, MN_ROLE_USER, "Short.");
    assert_int_equal(mn_session_save(e, o, other, &eb), MN_OK);
    mn_session_delete(e, o);
    static char good[1 << 22], bad[1 << 22];
    FILE *f = fopen(path, "rb");
    size_t n = fread(good, 1, sizeof good, f);
    fclose(f);
    assert_true(n > 0 && n < sizeof good);

    mn_session *k, *fk = NULL;
    assert_int_equal(mn_session_adopt_file(e, path, true, &k, &eb), MN_OK);
    mn_engine_stats a, b;
    mn_engine_stats_get(e, &a);
    /* a flipped byte in the last chunk: the blocks before it are already in the pool */
    memcpy(bad, good, n);
    bad[n - 3] ^= 0x5a;
    f = fopen(path, "wb");
    fwrite(bad, 1, n, f);
    fclose(f);
    assert_int_equal(mn_session_fork(e, k, &fk, &eb), MN_EFORMAT);
    assert_non_null(strstr(eb.msg, "checksum"));
    assert_null(fk);
    mn_engine_stats_get(e, &b);
    assert_int_equal(b.blocks_free, a.blocks_free);
    mn_session_info info;
    mn_session_info_get(e, k, &info);
    assert_string_equal(info.tier, "T3");
    /* another session's file in its place */
    assert_int_equal(rename(other, path), 0);
    assert_int_equal(mn_session_fork(e, k, &fk, &eb), MN_EMISMATCH);
    assert_non_null(strstr(eb.msg, "tokens"));
    mn_engine_stats_get(e, &b);
    assert_int_equal(b.blocks_free, a.blocks_free);
    /* the right bytes again */
    f = fopen(path, "wb");
    fwrite(good, 1, n, f);
    fclose(f);
    append(e, k, MN_ROLE_USER, "Which is the longest?");
    assert_logits_equal(ref, k, "restored after the file came back");
    mn_session_delete(e, k);
    mn_engine_free(e);
    mn_engine_free(ref);
    unlink(path);
    assert_int_equal(rmdir(dir), 0);
}

/* Layer-wise restore from T1: the copies go on the copy queue layer by layer and layer l
 * of the forward waits only for its own. With every copy made late (slow copies), the
 * forward overtakes the queue (some wait blocks: compute started before the restore was
 * done) and the logits still equal a session that never moved: a missing or misplaced
 * wait would read blocks the copy has not filled yet. */
static void test_tier_layerwise_restore(void **state) {
    mn_engine *e = engine(256), *ref = engine(256);
    mn_errbuf eb;
    mn_session *s, *other;
    assert_int_equal(mn_session_create(e, NULL, &s, &eb), MN_OK);
    assert_int_equal(mn_session_create(e, NULL, &other, &eb), MN_OK);
    append(e, s, MN_ROLE_USER, "Layer-wise restore: tell me about the rivers of Europe, the Danube and the Rhine first, "
                               "then the Loire, the Elbe and the Vistula, with one fact about each.");
    append(e, other, MN_ROLE_USER, "A resident session in the same batch.");
    assert_int_equal(mn_session_demote(e, s, 1, &eb), MN_OK);
    uint64_t c0, w0, c1, w1;
    mn_backend_cpu_copy_stats(be, &c0, &w0);
    mn_backend_cpu_slow_copies(be, 3000);
    /* both get tokens, so the restored session decodes in a batch with a resident one */
    assert_int_equal(mn_session_submit_text(e, s, MN_ROLE_USER, "And the Seine?", 14, &eb), MN_OK);
    assert_int_equal(mn_session_submit_text(e, other, MN_ROLE_USER, "Yes.", 4, &eb), MN_OK);
    mn_session_info info;
    mn_session_info_get(e, s, &info);
    assert_string_equal(info.tier, "T1"); /* submit leaves the restore to the step */
    while (mn_engine_has_work(e)) {
        bool did;
        assert_int_equal(mn_engine_step(e, &did, &eb), MN_OK);
    }
    mn_backend_cpu_copy_stats(be, &c1, &w1);
    mn_backend_cpu_slow_copies(be, 0);
    mn_session_info_get(e, s, &info);
    assert_string_equal(info.tier, "T0");
    assert_logits_equal(ref, s, "after a layer-wise restore");
    assert_logits_equal(ref, other, "resident, batched with a restore");
    assert_true(c1 - c0 >= (uint64_t)model->cfg.n_layer * 2); /* at least a copy per layer and K/V */
    assert_true(w1 > w0);                                     /* compute overtook the copies, and waited */
    mn_gen_params g = greedy(4);
    assert_int_equal(mn_session_generate(e, s, &g, NULL, NULL, NULL, &eb), MN_OK);
    assert_logits_equal(ref, s, "generating after a layer-wise restore");
    mn_engine_free(e);
    mn_engine_free(ref);
}

/* T1 images in pinned host memory (what a GPU backend does by default), forced here on the
 * CPU backend: an image that fits the pinned budget is pinned, the next one falls back to
 * pageable memory, both come back bit-identical, and promotion, demotion further down and
 * deletion give every pinned byte back. */
static void test_tier_pinned_t1(void **state) {
    char dir[] = "/tmp/mneme-test-pinned-XXXXXX";
    assert_non_null(mkdtemp(dir));
    mn_engine *e, *ref = engine(256);
    mn_errbuf eb;
    mn_engine_params p = {.block_size = 16, .n_blocks = 256, .max_batch_tokens = 256, .persist_dir = dir,
                          .t1_memory = MN_T1_PINNED};
    if (mn_engine_new(model, &p, &e, &eb) != MN_OK) fail_msg("%s", eb.msg);
    mn_session *a, *b;
    assert_int_equal(mn_session_create(e, NULL, &a, &eb), MN_OK);
    assert_int_equal(mn_session_create(e, NULL, &b, &eb), MN_OK);
    append(e, a, MN_ROLE_USER, "Pinned tier test: name three rivers.");
    append(e, b, MN_ROLE_USER, "Pageable tier test: name three mountains and a lake.");
    mn_session_info ia;
    mn_session_info_get(e, a, &ia);
    size_t saved_budget = be->budget[MN_MEM_HOST_PINNED];
    be->budget[MN_MEM_HOST_PINNED] = mn_backend_used(be, MN_MEM_HOST_PINNED) + (size_t)ia.kv_bytes; /* room for a */
    assert_int_equal(mn_backend_used(be, MN_MEM_HOST_PINNED), 0);
    assert_int_equal(mn_session_demote(e, a, 1, &eb), MN_OK);
    size_t one = mn_backend_used(be, MN_MEM_HOST_PINNED);
    assert_true(one > 0);                                           /* a's image is pinned */
    assert_int_equal(mn_session_demote(e, b, 1, &eb), MN_OK);      /* over the budget: pageable */
    assert_int_equal(mn_backend_used(be, MN_MEM_HOST_PINNED), one);
    append(e, a, MN_ROLE_USER, "And one sea.");
    append(e, b, MN_ROLE_USER, "And one sea.");
    assert_logits_equal(ref, a, "after a round trip through pinned T1");
    assert_logits_equal(ref, b, "after a round trip through pageable T1");
    assert_int_equal(mn_backend_used(be, MN_MEM_HOST_PINNED), 0);  /* promotion gave it back */
    assert_int_equal(mn_session_demote(e, a, 1, &eb), MN_OK);
    assert_true(mn_backend_used(be, MN_MEM_HOST_PINNED) > 0);
    assert_int_equal(mn_session_demote(e, a, 2, &eb), MN_OK);      /* T1 -> T2 frees the pinned image */
    assert_int_equal(mn_backend_used(be, MN_MEM_HOST_PINNED), 0);
    assert_int_equal(mn_session_demote(e, b, 1, &eb), MN_OK);
    assert_true(mn_backend_used(be, MN_MEM_HOST_PINNED) > 0);
    mn_session_delete(e, b);                                        /* and so does deletion */
    assert_int_equal(mn_backend_used(be, MN_MEM_HOST_PINNED), 0);
    be->budget[MN_MEM_HOST_PINNED] = saved_budget;
    mn_engine_free(e);
    mn_engine_free(ref);
    assert_int_equal(rmdir(dir), 0);
}

/* Idle demotion below T1 runs on the tier worker: the sessions are T1 until a step (or
 * tier_wait) installs the result; promoting or deleting a session whose job is still in
 * flight is safe; every session still equals a fresh one. */
static void test_idle_demotion_in_background(void **state) {
    char dir[] = "/tmp/mneme-test-idle-XXXXXX";
    assert_non_null(mkdtemp(dir));
    mn_engine *e = engine_tiers(256, 0, 0, dir), *ref = engine(256);
    mn_errbuf eb;
    enum { N = 6 };
    mn_session *s[N];
    for (int i = 0; i < N; i++) {
        char msg[128];
        snprintf(msg, sizeof msg, "Background tier test %d: name %d animals that live in the sea.", i, i + 2);
        assert_int_equal(mn_session_create(e, NULL, &s[i], &eb), MN_OK);
        append(e, s[i], MN_ROLE_USER, msg);
    }
    mn_session_info info;
    /* idle for 2.5x the threshold (T2 wanted), whatever the time it took to build them */
    mn_session_info_get(e, s[N - 1], &info);
    assert_int_equal(mn_engine_demote_idle(e, 1000.0, info.last_use + 2500.0, &eb), MN_OK);
    mn_engine_stats st;
    mn_engine_stats_get(e, &st);
    assert_int_equal(st.tier_sessions[0], 0);
    assert_int_equal(st.tier_sessions[1] + st.tier_sessions[2], N); /* T1 until installed */
    /* promote one and delete one while their jobs may still run */
    append(e, s[1], MN_ROLE_USER, "And one bird.");
    mn_session_delete(e, s[2]);
    s[2] = NULL;
    mn_engine_tier_wait(e);
    for (int i = 0; i < N; i++) {
        if (!s[i]) continue;
        mn_session_info_get(e, s[i], &info);
        assert_string_equal(info.tier, i == 1 ? "T0" : "T2");
    }
    mn_engine_stats_get(e, &st);
    assert_true(st.tier_bytes[2] > 0);
    assert_true(st.swapped_out[2] > 0);
    mn_session_info_get(e, s[1], &info);
    assert_int_equal(mn_engine_demote_idle(e, 1000.0, info.last_use + 100000.0, &eb), MN_OK); /* T2 -> T3: on this thread */
    mn_session_info_get(e, s[1], &info);
    assert_string_equal(info.tier, "T1"); /* s[1] was T0: T1 at once; its job to T3 installs later */
    mn_engine_tier_wait(e);
    for (int i = 0; i < N; i++) {
        if (!s[i]) continue;
        mn_session_info_get(e, s[i], &info);
        assert_string_equal(info.tier, "T3");
        append(e, s[i], MN_ROLE_USER, "Which is largest?");
        assert_logits_equal(ref, s[i], "a session demoted in the background");
    }
    /* a job still queued when the engine goes away is dropped cleanly */
    mn_session_info_get(e, s[1], &info);
    assert_int_equal(mn_engine_demote_idle(e, 1000.0, info.last_use + 100000.0, &eb), MN_OK);
    for (int i = 0; i < N; i++)
        if (s[i]) mn_session_delete(e, s[i]);
    mn_engine_free(e);
    mn_engine_free(ref);
    assert_int_equal(rmdir(dir), 0); /* no file left by an orphaned job */
}

/* Messages appended one at a time are the tokens of the whole conversation rendered by
 * the model's template: every message keeps its opening (SmolLM2's BOS is <|im_start|>,
 * which a per-message rule once stripped from every later message). */
static void test_framing_matches_template(void **state) {
    mn_engine *e = engine(64);
    mn_errbuf eb;
    mn_session *s;
    assert_int_equal(mn_session_create(e, "Be brief.", &s, &eb), MN_OK);
    append(e, s, MN_ROLE_USER, "Hi");
    append(e, s, MN_ROLE_ASSISTANT, "Hello! How can I help?");
    append(e, s, MN_ROLE_USER, "Name a colour.");
    mn_chat_msg msgs[4] = {{"system", "Be brief."}, {"user", "Hi"}, {"assistant", "Hello! How can I help?"},
                           {"user", "Name a colour."}};
    char *text;
    size_t len;
    assert_int_equal(mn_chat_render(&model->chat, msgs, 4, false, &text, &len, &eb), MN_OK);
    int32_t *want;
    int64_t n_want;
    assert_int_equal(mn_tokenize(model->tok, text, len, MN_TOK_PARSE_SPECIAL, &want, &n_want, &eb), MN_OK);
    int32_t n;
    const int32_t *got = mn_session_tokens(s, NULL, &n);
    if (n != n_want || memcmp(got, want, (size_t)n * sizeof *got) != 0) fail_msg("session tokens differ from the rendered conversation:\n%s", text);
    mn_free(text);
    mn_free(want);
    mn_engine_free(e);
}

/* T0 -> T3 -> engine freed -> a new engine on the same directory adopts the session
 * under its id and it continues bit-identically; a damaged file is refused, left alone,
 * and disturbs nothing. */
static void test_restart_adopts_persisted(void **state) {
    char dir[] = "/tmp/mneme-test-restart-XXXXXX";
    assert_non_null(mkdtemp(dir));
    mn_engine *e = engine_tiers(256, 0, 0, dir), *ref = engine(256);
    mn_errbuf eb;
    mn_session *s, *keep;
    assert_int_equal(mn_session_create(e, NULL, &s, &eb), MN_OK);
    append(e, s, MN_ROLE_USER, "Remember this across a restart: the password is swordfish.");
    assert_int_equal(mn_session_create(e, NULL, &keep, &eb), MN_OK);
    append(e, keep, MN_ROLE_USER, "A second persisted session.");
    char id[33], id2[33];
    snprintf(id, sizeof id, "%s", mn_session_id(s));
    snprintf(id2, sizeof id2, "%s", mn_session_id(keep));
    int32_t n0;
    const int32_t *t0 = mn_session_tokens(s, NULL, &n0);
    int32_t *before = malloc((size_t)n0 * sizeof *before);
    memcpy(before, t0, (size_t)n0 * sizeof *before);
    assert_int_equal(mn_session_demote(e, s, 3, &eb), MN_OK);
    assert_int_equal(mn_session_demote(e, keep, 3, &eb), MN_OK);
    mn_engine_free(e);
    /* a damaged file with a valid name, and a file with another name */
    char bad[256], other[256];
    snprintf(bad, sizeof bad, "%s/%032x.mns", dir, 7);
    snprintf(other, sizeof other, "%s/notes.txt", dir);
    FILE *f = fopen(bad, "wb");
    fputs("MNSESS but not really a session file", f);
    fclose(f);
    f = fopen(other, "wb");
    fputs("x", f);
    fclose(f);

    mn_engine *e2 = engine_tiers(256, 0, 0, dir);
    int32_t adopted, refused;
    assert_int_equal(mn_engine_adopt_persisted(e2, &adopted, &refused, &eb), MN_OK);
    assert_int_equal(adopted, 2);
    assert_int_equal(refused, 1);
    assert_non_null(strstr(eb.msg, "00000000000000000000000000000007.mns"));
    assert_int_equal(access(bad, R_OK), 0); /* refused files stay for a person to look at */
    mn_session *r = mn_session_find(e2, id);
    assert_non_null(r);
    assert_non_null(mn_session_find(e2, id2));
    mn_session_info info;
    mn_session_info_get(e2, r, &info);
    assert_string_equal(info.tier, "T3");
    int32_t n1;
    const int32_t *t1 = mn_session_tokens(r, NULL, &n1);
    assert_int_equal(n1, n0);
    assert_memory_equal(t1, before, (size_t)n0 * sizeof *before);
    /* adopting again finds nothing new */
    assert_int_equal(mn_engine_adopt_persisted(e2, &adopted, &refused, &eb), MN_OK);
    assert_int_equal(adopted, 0);
    append(e2, r, MN_ROLE_USER, "What is the password?"); /* restores from the file */
    mn_session_info_get(e2, r, &info);
    assert_string_equal(info.tier, "T0");
    assert_logits_equal(ref, r, "a session adopted after a restart");
    mn_session_delete(e2, r);
    mn_session_delete(e2, mn_session_find(e2, id2));
    mn_engine_free(e2);
    mn_engine_free(ref);
    free(before);
    unlink(bad);
    unlink(other);
    assert_int_equal(rmdir(dir), 0); /* deleted sessions took their files with them */
}

/* Room in T0 for 4 sessions, 64 sessions taking turns; tiny host budgets force the
 * cascade T1 -> T2 -> T3. Every checked session still equals a fresh one, and the KV
 * reserve keeps the turns from waiting for demotions. */
static void test_tier_budgets(void **state) {
    char dir[] = "/tmp/mneme-test-budget-XXXXXX";
    assert_non_null(mkdtemp(dir));
    const int N = 64;
    mn_engine *e = engine_tiers(4 * 4, 2 * 1024 * 1024, 4 * 1024 * 1024, dir), *ref = engine(64);
    mn_errbuf eb;
    mn_session **ss = calloc(N, sizeof *ss);
    for (int i = 0; i < N; i++) {
        char msg[256];
        snprintf(msg, sizeof msg, "Agent %d here. My favourite number is %d, my favourite colour is the colour of "
                 "the sea at dawn, and I keep a small notebook of every game I have played with you so far.", i, i * 37 % 101);
        assert_int_equal(mn_session_create(e, NULL, &ss[i], &eb), MN_OK);
        if (mn_session_append_text(e, ss[i], MN_ROLE_NONE, msg, strlen(msg), &eb) != MN_OK) fail_msg("session %d: %s", i, eb.msg);
    }
    mn_engine_stats st;
    mn_engine_stats_get(e, &st);
    assert_true(st.tier_sessions[0] <= 5);
    assert_true(st.tier_sessions[1] + st.tier_sessions[2] + st.tier_sessions[3] >= N - 4);
    assert_true(st.tier_sessions[3] > 0);      /* the budgets pushed some down to disk */
    assert_true(st.tier_bytes[1] <= 2 * 1024 * 1024);
    for (int round = 0; round < 2; round++)
        for (int i = 0; i < N; i++) {
            append(e, ss[i], MN_ROLE_NONE, round ? " Again." : " Hello?");
            mn_gen_params g = greedy(2);
            if (mn_session_generate(e, ss[i], &g, NULL, NULL, NULL, &eb) != MN_OK) fail_msg("session %d: %s", i, eb.msg);
        }
    for (int i = 0; i < N; i += 9) {
        append(e, ss[i], MN_ROLE_NONE, " Bye.");
        assert_logits_equal(ref, ss[i], "a session that went through the tiers");
    }
    mn_engine_stats_get(e, &st);
    assert_true(st.swapped_in[1] + st.swapped_in[2] + st.swapped_in[3] > 0);
    /* the KV reserve (default: half this tiny pool) refilled it in the background, so turns
     * found blocks: only the first shortage waits for a demotion's copy, not every turn */
    assert_true(st.reserve_demotions > N);
    assert_true(st.demotions_waited * 10 < st.demotions_background);
    for (int i = 0; i < N; i++) mn_session_delete(e, ss[i]);
    for (int k = 0; k < 5000; k++) { /* blocks of copies out still in flight come back at a step */
        bool did;
        assert_int_equal(mn_engine_step(e, &did, &eb), MN_OK);
        mn_engine_stats_get(e, &st);
        if (!st.blocks_draining) break;
        usleep(1000);
    }
    assert_int_equal(st.tier_bytes[1], 0);
    assert_int_equal(st.tier_bytes[2], 0);
    assert_int_equal(st.blocks_total - st.blocks_free, st.prefix_entries);
    free(ss);
    mn_engine_free(e);
    mn_engine_free(ref);
    assert_int_equal(rmdir(dir), 0);
}

int main(void) {
    const char *allow = getenv("MNEME_ALLOW_NO_MODEL");
    FILE *f = fopen(model_path(), "rb");
    if (!f && allow && *allow == '1') return 0;
    if (f) fclose(f);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chat_and_generate),
        cmocka_unit_test(test_fork_diverge),
        cmocka_unit_test(test_rewind),
        cmocka_unit_test(test_prefix_sharing),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_save_load),
        cmocka_unit_test(test_tier_round_trips),
        cmocka_unit_test(test_tier_pinned_t1),
        cmocka_unit_test(test_tier_layerwise_restore),
        cmocka_unit_test(test_adopt_file),
        cmocka_unit_test(test_t3_file_changed),
        cmocka_unit_test(test_idle_demotion_t1_background),
        cmocka_unit_test(test_tier_budgets),
        cmocka_unit_test(test_restart_adopts_persisted),
        cmocka_unit_test(test_framing_matches_template),
        cmocka_unit_test(test_idle_demotion_in_background),
    };
    if (getenv("MNEME_TEST_FILTER")) cmocka_set_test_filter(getenv("MNEME_TEST_FILTER")); /* e.g. for a TSan run */
    return cmocka_run_group_tests(tests, setup, teardown);
}
