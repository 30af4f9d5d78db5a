/* tests/unit/gen_compare.h — the same generations with the sample op on the backend and
 * on the host (mn_engine_params.sample_on), compared. Plain C, no test framework: the
 * cmocka test (tests/unit/test_session_sample.c, CPU backend, SmolLM2) and the GPU check
 * (tests/gpu/test_cuda_session_sample.c, CUDA backend) both drive it.
 *
 * gc_run: one engine on model m with sample_on, one session per case, each given a
 * prompt of token ids and started with mn_session_generate_start at the case's step
 * (so later starts put prefill chunks into batches of decode tokens); steps until no work
 * is left, recording every token, its mn_sample_info, whether mn_session_logits was NULL
 * right after the session's first step, the session's final logits and the engine stats.
 * gc_compare: backend against host:
 *   - the same tokens for every session (same seed, same draws u);
 *   - logprobs within the op's tolerance (kernels/ops.h: MN_SAMPLE_TOL * (1 + |lp|)),
 *     top ids exact;
 *   - the final logits (the last token is computed with the generation finished, so they
 *     reach the host in both modes) bit-identical: the batches are the same in both runs;
 *   - the path: host run: sampled_backend 0; backend run: sampled_host = the tokens of the
 *     host-only cases (bias, penalties), sampled_backend = the rest, and exactly
 *     sampled_backend * n_vocab floats fewer of logits copied to the host;
 *   - after its first step (the prompt computed, the first token chosen) a backend-sampled
 *     session has no host logits (mn_session_logits NULL), a host-only one has them.
 * Ownership: gc_run allocates *out (gc_free releases it).
 */
#ifndef MN_TESTS_GEN_COMPARE_H
#define MN_TESTS_GEN_COMPARE_H

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/session.h"

#define GC_MAX_CASES 8
#define GC_MAX_TOKENS 32

typedef struct gc_case {
    const char *name;
    mn_sampling_params sp;
    int32_t start_step;      /* mn_session_generate_start before this step (0: before the first) */
    bool host_only;          /* the op cannot serve it (bias, penalty): sampled on the host */
} gc_case;

typedef struct gc_stream {
    int32_t n;
    int32_t tok[GC_MAX_TOKENS];
    mn_sample_info info[GC_MAX_TOKENS];
    int32_t n_done;
    mn_err err;
    bool logits_after_first;   /* mn_session_logits non-NULL after the session's first step */
    float *final_logits;       /* [n_vocab] */
} gc_stream;

typedef struct gc_result {
    int32_t n_cases;
    gc_stream s[GC_MAX_CASES];
    mn_engine_stats st;
} gc_result;

static bool gc__on_token(void *ud, int32_t token, const char *text, size_t len, const mn_sample_info *info) {
    (void)text, (void)len;
    gc_stream *st = ud;
    if (st->n < GC_MAX_TOKENS) {
        st->tok[st->n] = token;
        if (info) st->info[st->n] = *info;
        else memset(&st->info[st->n], 0, sizeof st->info[st->n]);
    }
    st->n++;
    return true;
}

static void gc__on_done(void *ud, const mn_gen_result *res, mn_err err, const char *msg) {
    (void)res, (void)msg;
    gc_stream *st = ud;
    st->n_done++;
    st->err = err;
}

static void gc_free(gc_result *r) {
    if (!r) return;
    for (int32_t i = 0; i < r->n_cases; i++) free(r->s[i].final_logits);
    free(r);
}

/* Returns 1 and *out on success, 0 with why filled on failure. */
static int gc_run(mn_model *m, mn_sample_on on, const gc_case *cases, int32_t n_cases, int32_t max_tokens,
                  gc_result **out, char *why, size_t cap) {
    const int32_t V = m->cfg.n_vocab;
    mn_errbuf eb = {{0}};
    mn_engine *e = NULL;
    mn_session *ss[GC_MAX_CASES] = {0};
    gc_result *r = calloc(1, sizeof *r);
    int ok = 0;
    *out = NULL;
    if (!r || n_cases > GC_MAX_CASES || max_tokens > GC_MAX_TOKENS) {
        snprintf(why, cap, "gc_run: bad arguments or out of memory");
        goto done;
    }
    r->n_cases = n_cases;
    mn_engine_params ep = {.block_size = 16, .n_blocks = 256, .max_batch_tokens = 256, .sample_on = on};
    if (mn_engine_new(m, &ep, &e, &eb) != MN_OK) { snprintf(why, cap, "engine: %.400s", eb.msg); goto done; }
    for (int32_t i = 0; i < n_cases; i++)
        if (mn_session_create(e, NULL, &ss[i], &eb) != MN_OK) { snprintf(why, cap, "create: %.400s", eb.msg); goto done; }
    for (int32_t step = 0;; step++) {
        for (int32_t i = 0; i < n_cases; i++) {
            if (cases[i].start_step != step) continue;
            int32_t prompt[40], n = 9 + 3 * i; /* different lengths and tokens per case */
            for (int32_t k = 0; k < n; k++) prompt[k] = (int32_t)((k * 37 + i * 101 + 5) % V);
            mn_gen_params g = {.sampling = cases[i].sp, .max_tokens = max_tokens};
            if (mn_session_submit_tokens(e, ss[i], prompt, n, MN_ROLE_NONE, &eb) != MN_OK ||
                mn_session_generate_start(e, ss[i], &g, gc__on_token, gc__on_done, &r->s[i], &eb) != MN_OK) {
                snprintf(why, cap, "%s: start: %.400s", cases[i].name, eb.msg);
                goto done;
            }
        }
        bool later = false;
        for (int32_t i = 0; i < n_cases; i++) later |= cases[i].start_step > step;
        if (!later && !mn_engine_has_work(e)) break;
        if (step >= 1000) { snprintf(why, cap, "no end after 1000 steps"); goto done; }
        bool did;
        if (mn_engine_step(e, &did, &eb) != MN_OK) { snprintf(why, cap, "step %d: %.400s", (int)step, eb.msg); goto done; }
        for (int32_t i = 0; i < n_cases; i++)
            if (cases[i].start_step == step) r->s[i].logits_after_first = mn_session_logits(ss[i]) != NULL;
    }
    for (int32_t i = 0; i < n_cases; i++) {
        gc_stream *st = &r->s[i];
        const float *l = mn_session_logits(ss[i]);
        if (st->n_done != 1 || st->err != MN_OK || st->n < 1 || st->n > max_tokens) {
            snprintf(why, cap, "%s: done %d times, err %s, %d tokens", cases[i].name, (int)st->n_done,
                     mn_err_name(st->err), (int)st->n);
            goto done;
        }
        if (!l) { snprintf(why, cap, "%s: no logits after the generation", cases[i].name); goto done; }
        if (!(st->final_logits = malloc((size_t)V * sizeof(float)))) { snprintf(why, cap, "out of memory"); goto done; }
        memcpy(st->final_logits, l, (size_t)V * sizeof(float));
    }
    mn_engine_stats_get(e, &r->st);
    ok = 1;
done:
    if (e) mn_engine_free(e); /* deletes the sessions */
    if (ok) *out = r;
    else gc_free(r);
    return ok;
}

static bool gc__lp_close(float a, float ref) {
    return fabs((double)a - (double)ref) <= MN_SAMPLE_TOL * (1.0 + fabs((double)ref));
}

/* Returns 1 when backend run b agrees with host run h as the header says, else 0 and why. */
static int gc_compare(const gc_result *h, const gc_result *b, const gc_case *cases, int32_t V, char *why, size_t cap) {
    int64_t total = 0, host_only = 0;
    for (int32_t i = 0; i < h->n_cases; i++) {
        const gc_stream *x = &h->s[i], *y = &b->s[i];
        const char *nm = cases[i].name;
        if (x->n != y->n) { snprintf(why, cap, "%s: %d tokens on the host, %d on the backend", nm, (int)x->n, (int)y->n); return 0; }
        for (int32_t t = 0; t < x->n; t++) {
            if (x->tok[t] != y->tok[t]) {
                snprintf(why, cap, "%s: token %d: host %d, backend %d", nm, (int)t, (int)x->tok[t], (int)y->tok[t]);
                return 0;
            }
            if (cases[i].sp.n_logprobs == 0) continue;
            const mn_sample_info *p = &x->info[t], *q = &y->info[t];
            if (!gc__lp_close(q->logprob, p->logprob) || p->n_top != q->n_top || p->n_top != cases[i].sp.n_logprobs) {
                snprintf(why, cap, "%s: token %d: logprob %.9g vs %.9g, n_top %d vs %d", nm, (int)t, (double)p->logprob,
                         (double)q->logprob, (int)p->n_top, (int)q->n_top);
                return 0;
            }
            for (int32_t j = 0; j < p->n_top; j++)
                if (p->top[j].token != q->top[j].token || !gc__lp_close(q->top[j].logprob, p->top[j].logprob)) {
                    snprintf(why, cap, "%s: token %d: top %d: host (%d, %.9g), backend (%d, %.9g)", nm, (int)t, (int)j,
                             (int)p->top[j].token, (double)p->top[j].logprob, (int)q->top[j].token, (double)q->top[j].logprob);
                    return 0;
                }
        }
        if (memcmp(x->final_logits, y->final_logits, (size_t)V * sizeof(float)) != 0) {
            snprintf(why, cap, "%s: final logits differ", nm);
            return 0;
        }
        if (!x->logits_after_first) { snprintf(why, cap, "%s: host mode: no logits after the first step", nm); return 0; }
        if (y->logits_after_first != cases[i].host_only) {
            snprintf(why, cap, "%s: backend mode: logits %s after the first step", nm,
                     y->logits_after_first ? "on the host" : "missing");
            return 0;
        }
        total += x->n;
        if (cases[i].host_only) host_only += x->n;
    }
    const mn_engine_stats *hs = &h->st, *bs = &b->st;
    if (hs->sampled_backend != 0 || hs->sampled_host != total) {
        snprintf(why, cap, "host mode: sampled backend %lld host %lld, want 0 and %lld", (long long)hs->sampled_backend,
                 (long long)hs->sampled_host, (long long)total);
        return 0;
    }
    if (bs->sampled_host != host_only || bs->sampled_backend != total - host_only) {
        snprintf(why, cap, "backend mode: sampled backend %lld host %lld, want %lld and %lld",
                 (long long)bs->sampled_backend, (long long)bs->sampled_host, (long long)(total - host_only),
                 (long long)host_only);
        return 0;
    }
    if (hs->logits_bytes - bs->logits_bytes != bs->sampled_backend * V * (int64_t)sizeof(float)) {
        snprintf(why, cap, "logits bytes to the host: %lld (host mode) vs %lld (backend mode), want a difference of %lld",
                 (long long)hs->logits_bytes, (long long)bs->logits_bytes,
                 (long long)(bs->sampled_backend * V * (int64_t)sizeof(float)));
        return 0;
    }
    return 1;
}

/* The standard mix: greedy; temperature with top-k / top-p / min-p and seeds; logprobs
 * (5, the maximum 20, greedy with 3); two the op cannot serve (penalties, logit bias),
 * one with a penalty that is off (repeat_last_n 0: the op serves it); three start later,
 * so their prefill shares batches with the others' decode tokens. bias[0] must stay alive
 * while the cases are used. Returns the number of cases. */
static int32_t gc_standard_cases(gc_case *c, mn_logit_bias *bias, int32_t V) {
    mn_sampling_params d = mn_sampling_defaults();
    int32_t n = 0;
    c[n] = (gc_case){"greedy", d, 0, false};
    c[n++].sp.temperature = 0.0f;
    c[n] = (gc_case){"defaults (T 0.8, top-k 40, top-p 0.95, min-p 0.05) seed 42", d, 0, false};
    c[n++].sp.seed = 42;
    c[n] = (gc_case){"T 1.3, top-p 0.9, 5 logprobs, seed 7", d, 0, false};
    c[n].sp.temperature = 1.3f, c[n].sp.top_k = 0, c[n].sp.top_p = 0.9f, c[n].sp.min_p = 0.0f;
    c[n].sp.n_logprobs = 5, c[n++].sp.seed = 7;
    c[n] = (gc_case){"T 0.7, top-k 20, min-p 0.1, 20 logprobs, seed 3", d, 1, false};
    c[n].sp.temperature = 0.7f, c[n].sp.top_k = 20, c[n].sp.top_p = 1.0f, c[n].sp.min_p = 0.1f;
    c[n].sp.n_logprobs = 20, c[n++].sp.seed = 3;
    c[n] = (gc_case){"greedy, 3 logprobs", d, 0, false};
    c[n].sp.temperature = 0.0f, c[n++].sp.n_logprobs = 3;
    c[n] = (gc_case){"penalties (host)", d, 2, true};
    c[n].sp.repeat_penalty = 1.3f, c[n].sp.presence_penalty = 0.4f, c[n++].sp.seed = 11;
    bias[0] = (mn_logit_bias){(int32_t)(42 % V), 3.0f};
    c[n] = (gc_case){"logit bias (host)", d, 0, true};
    c[n].sp.bias = bias, c[n].sp.n_bias = 1, c[n++].sp.seed = 5;
    c[n] = (gc_case){"repeat penalty, window 0 (op), T 1.0, seed 9", d, 3, false};
    c[n].sp.repeat_penalty = 1.5f, c[n].sp.repeat_last_n = 0, c[n].sp.temperature = 1.0f, c[n++].sp.seed = 9;
    return n;
}

#endif
